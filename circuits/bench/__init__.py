"""Benchmarks: named, registered, each returning figures compared with a goal.

A benchmark is a plain function ``fn(**options) -> dict`` in its own module, registered below
in ``BENCHMARKS`` under a name and a description; its result holds ``figures`` ({name: {value,
unit, goal, better}}) plus free-form context (the model, the batch, the machine).
``circuits bench NAME [--json]`` runs one and prints a table (or JSON). Figures are measured
side by side in one process, so ratios are meaningful even on a busy machine; absolute times
are not. Results go in ``docs/performance.md``.

- ``common.py``: ``Benchmark``, ``figure``, ``machine``, ``quietly``, ``print_result``.
- ``extract.py``: ``extract`` and ``extract-70m`` (the sweep's extraction vs a bare forward).
- ``discover.py``: ``discover`` (EAP / EAP-IG against forward+backward and TL 4.3).
- ``app.py``: ``app`` (the Streamlit app in the browser and server side, on synthetic studies or ``--study``).
- ``scaling.py``: ``scaling`` (steps and Ray workers).
- ``formation.py``: ``formation`` (the formation account's cost on the sweep).
- ``pythia.py``: ``pythia`` (one sweep step at Pythia's shapes, a trained checkpoint, EAP-IG(5)).
- ``llc.py``: ``llc`` (the LLC's cost per checkpoint against the sweep's step; devinterp's defaults).

To add one: write ``bench_x(device: str = "cpu", ...) -> dict`` in a module here, returning
``{"figures": {"ratio": figure(value, "x", goal=4.0)}, "model": {...}}``, register it below,
and name it in the help of ``circuits bench`` (``circuits/cli.py``; a test checks the two agree).

The library never imports this package (only ``circuits/cli.py`` does, inside ``bench``).
"""

from __future__ import annotations

import time
from typing import Any

from circuits.bench.app import app_figures
from circuits.bench.common import Benchmark, figure, machine, print_result
from circuits.bench.discover import discover_figures
from circuits.bench.extract import bench_extract, bench_extract_70m
from circuits.bench.formation import bench_formation
from circuits.bench.llc import bench_llc
from circuits.bench.pythia import bench_pythia
from circuits.bench.scaling import bench_scaling
from circuits.errors import CircuitsError

__all__ = ["BENCHMARKS", "Benchmark", "bench_all", "bench_extract", "bench_scaling", "figure", "machine",
           "print_result", "run_benchmark"]

_OPTIONS_OF = {"extract": ("manifest", "step"), "scaling": ("run",), "formation": ("run",), "app": ("study",),
               "llc": ("run",),
              "pythia": ("size", "train_steps", "eap_ig_python", "max_memory")}


# Run on their own only: ``pythia`` takes ~1 min and ~5 GB at its default 160m shape (more on
# a loaded machine), beyond what ``circuits bench`` (all) should cost; ``llc`` needs the optional
# ``llc`` extra (devinterp) and ~1-3 min.
NOT_IN_ALL = ("pythia", "llc")


def bench_all(device: str = "cpu", **options: Any) -> dict[str, Any]:
    """Run every other registered benchmark (but ``NOT_IN_ALL``) in turn; one that fails is reported, not fatal."""
    results: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    for name in [n for n in BENCHMARKS if n not in ("all", *NOT_IN_ALL)]:
        started = time.perf_counter()
        try:
            mine = {k: v for k, v in options.items() if k in _OPTIONS_OF.get(name, ())}
            result = BENCHMARKS[name].run(device=device, **mine)
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
            result = {"figures": {}, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
        result["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = result
        figures |= {f"{name}: {key}": fig for key, fig in result["figures"].items()}
    return {"figures": figures, "results": results}


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("extract", "cache + compressed write of one step vs a bare forward; bytes; one-head read",
              bench_extract),
    Benchmark("extract-70m", "the extract benchmark on a Pythia-70m-shaped model (smaller batches)",
              bench_extract_70m),
    Benchmark("discover", "EAP / EAP-IG scoring vs forward+backward, faithfulness, TL 4.3 attribution patching "
              "(CPU time)", discover_figures),
    Benchmark("app", "app in chromium (page open, step switch, node click: demo-sized and Pythia-160m-sized "
              "studies) and server side (open a 154-step study, switch step: AppTest, whole-page rerun)",
              app_figures),
    Benchmark("scaling", "sweep time and peak memory over 10 vs 40 steps (local); steps/s with 1 vs 2 Ray workers",
              bench_scaling),
    Benchmark("formation", "the sweep with the formation defaults (bootstrap, node effects, trust check) vs the "
              "account off, built-in induction run, EAP-IG(5)", bench_formation),
    Benchmark("pythia", "one sweep step (EAP-IG(5), induction, load included) of a briefly trained GPTNeoX of "
              "Pythia's shape (160m; --size 410m, 1b): time, peak RSS, shard bytes, phase shares", bench_pythia),
    Benchmark("llc", "the LLC (devinterp SGLD, default settings) per checkpoint vs the sweep's step (method none), "
              "built-in induction run; devinterp's defaults vs ours", bench_llc),
    Benchmark("all", "every benchmark, one run, figures side by side", bench_all),
]}


def run_benchmark(name: str, **options: Any) -> dict[str, Any]:
    if name not in BENCHMARKS:
        raise CircuitsError(f"unknown benchmark {name!r}; expected one of: {', '.join(sorted(BENCHMARKS))}")
    started = time.perf_counter()
    result = BENCHMARKS[name].run(**options)
    return {"benchmark": name, "description": BENCHMARKS[name].description, **result,
            "machine": machine(), "seconds": round(time.perf_counter() - started, 1)}
