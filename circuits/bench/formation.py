"""Benchmark ``formation``: what the formation account costs the sweep (issue 13's goal: <= 1.3x).

Two sweeps of the same steps of the built-in induction run (trained here unless ``run`` is
given), EAP-IG(5), default hooks (as ``circuits sweep RUN --task induction --method eap-ig``), in this process with one torch thread, alternated A B B A ... so that a
change of machine speed hits both alike:

- **A, the formation defaults**: per-example scores, a 20-resample bootstrap and the stable
  circuit's faithfulness at every step, node effects (exact on this 9-writer graph), and the
  trust check against exact patching at 5 spread steps;
- **B, the account off**: one resample (the sweep needs at least one; one re-selection and one
  more ablated forward a step), node effects by attribution (no forward), no trust check. This
  is the sweep before the formation work, up to that one resample.

Figures: A / B in wall and CPU time (goal 1.3), and each as seconds per step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from circuits.bench.common import figure, induction_run

ACCOUNT_OFF = {"resamples": 1, "trust_steps": 0, "node_effects": "attribution"}


def _timed_sweep(run: Path, out: Path, steps: str, device: str, settings: dict[str, Any]) -> dict[str, float]:
    from circuits.sweep import sweep

    t0, c0 = time.perf_counter(), time.process_time()
    study = sweep(run, "induction", out, steps=steps, method="eap-ig", device=device, progress=False, **settings)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "steps": len(study.steps)}


def bench_formation(device: str = "cpu", run: str | None = None, steps: str = "all", rounds: int = 2) -> dict[str, Any]:
    """Sweeps A (formation defaults) and B (account off) of ``steps``, ``rounds`` times each."""
    import torch

    torch.set_num_threads(1)
    context: dict[str, Any] = {}
    timings: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="circuits-bench-formation-") as tmp:
        root = Path(tmp)
        run_dir = induction_run(run, root, context)
        _timed_sweep(run_dir, root / "warm", "0", device, ACCOUNT_OFF)  # imports and first loads out of the timing
        for r in range(rounds):
            for kind in ("AB" if r % 2 == 0 else "BA"):
                settings = {} if kind == "A" else ACCOUNT_OFF
                timings[kind].append(_timed_sweep(run_dir, root / f"{kind}{r}", steps, device, settings))
    median = {k: {m: statistics.median(x[m] for x in runs) for m in ("wall_s", "cpu_s")} for k, runs in timings.items()}
    n = timings["A"][0]["steps"]
    return {
        "figures": {
            "formation defaults / account off (wall)": figure(median["A"]["wall_s"] / median["B"]["wall_s"], "x",
                                                              goal=1.3),
            "formation defaults / account off (CPU)": figure(median["A"]["cpu_s"] / median["B"]["cpu_s"], "x",
                                                             goal=1.3),
            "formation defaults, per step (wall)": figure(median["A"]["wall_s"] / n, "s"),
            "account off, per step (wall)": figure(median["B"]["wall_s"] / n, "s"),
        },
        "model": {"run": "built-in induction (2-layer attn-only d64)", "method": "eap-ig(5)", "hooks": "default",
                  "steps": n, "device": device, "torch_threads": 1, **context},
        "batch": {"rounds": rounds, "order": "A B, then B A, alternating", "account_off": ACCOUNT_OFF},
        "rounds": {k: [{m: round(v, 2) for m, v in x.items()} for x in runs] for k, runs in timings.items()},
    }
