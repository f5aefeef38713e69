"""Benchmark ``llc``: what the LLC costs per checkpoint, side by side with the sweep's own step.

On the built-in induction run (trained here unless ``run`` is given), three spread steps (the
first, the middle and the last checkpoint), one torch thread, in this process:

- **sweep, llc off**: ``circuits sweep RUN --task induction`` (method none, default hooks);
- **sweep, llc on**: the same with ``--analyses llc`` at the default settings
  (``circuits.llc.LLCSettings``);
- **devinterp's defaults**: one estimate at the middle step with 4 chains x 200 draws, no
  burn-in (devinterp's ``sample`` defaults), against ours at the same step.

Figures: the LLC's cost per checkpoint ((on - off) / steps), the sweep's per step, their ratio,
and devinterp's defaults / ours. Sweeps alternate off, on, on, off so a change of machine speed
hits both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from circuits.bench.common import figure, induction_run


def _timed_sweep(run: Path, out: Path, steps: str, device: str, llc: bool) -> float:
    from circuits.sweep import sweep

    t0 = time.perf_counter()
    sweep(run, "induction", out, steps=steps, device=device, progress=False, extra_analyses=("llc",) if llc else ())
    return time.perf_counter() - t0


def _timed_estimate(run: Path, step: int, settings, device: str) -> float:
    import circuits
    from circuits.llc import estimate_at

    manifest = circuits.load_manifest(run)
    model = circuits.load(manifest, step, device)
    t0 = time.perf_counter()
    estimate_at(model, manifest, None, step, settings, device)
    return time.perf_counter() - t0


def bench_llc(device: str = "cpu", run: str | None = None, rounds: int = 2) -> dict[str, Any]:
    """The sweep of 3 spread steps with and without the llc analysis, ``rounds`` times each."""
    import torch

    from circuits.llc import LLCSettings
    from circuits.manifest import load_manifest

    torch.set_num_threads(1)
    context: dict[str, Any] = {}
    times: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="circuits-bench-llc-") as tmp:
        root = Path(tmp)
        run_dir = induction_run(run, root, context)
        all_steps = load_manifest(run_dir).steps
        chosen = sorted({all_steps[0], all_steps[len(all_steps) // 2], all_steps[-1]})
        steps = ",".join(map(str, chosen))
        _timed_sweep(run_dir, root / "warm", str(chosen[0]), device, llc=True)  # imports out of the timing
        for r in range(rounds):
            for kind in (("off", "on") if r % 2 == 0 else ("on", "off")):
                times[kind].append(_timed_sweep(run_dir, root / f"{kind}{r}", steps, device, llc=kind == "on"))
        middle = chosen[len(chosen) // 2]
        ours = _timed_estimate(run_dir, middle, LLCSettings(), device)
        theirs = _timed_estimate(run_dir, middle, LLCSettings(chains=4, draws=200, burnin=0), device)
    off, on = statistics.median(times["off"]) / len(chosen), statistics.median(times["on"]) / len(chosen)
    per_checkpoint = on - off
    s = LLCSettings()
    return {
        "figures": {
            "llc per checkpoint (wall)": figure(per_checkpoint, "s"),
            "sweep per step, llc off (wall)": figure(off, "s"),
            "llc / sweep step": figure(per_checkpoint / off, "x"),
            "sweep with llc / without": figure(on / off, "x"),
            "devinterp defaults (4 x 200) / ours, one estimate": figure(theirs / ours, "x", goal=1.0, better="higher"),
        },
        "model": {"run": "built-in induction (2-layer attn-only d64)", "method": "none", "hooks": "default",
                  "steps": chosen, "device": device, "torch_threads": 1, **context},
        "batch": {"rounds": rounds, "llc settings": s.to_dict(), "sgld steps per checkpoint": s.chains * (s.draws + s.burnin),
                  "one estimate, ours (s)": round(ours, 2), "one estimate, devinterp defaults (s)": round(theirs, 2)},
        "rounds": {k: [round(v, 2) for v in runs] for k, runs in times.items()},
    }
