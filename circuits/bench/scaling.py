"""Benchmark ``scaling``: sweep time and peak memory as the number of steps grows (local), and
steps/s with 1 vs N Ray workers.

Each local sweep runs in a fresh process (``child_main``, started by ``_local_sweep_in_child``),
so that its peak RSS is that sweep's alone.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from circuits.bench.common import figure, induction_run
from circuits.errors import CircuitsError

CHILD = "from circuits.bench.scaling import child_main; child_main()"  # the child's whole program


def _rss_mb() -> float:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child_main(argv: list[str] | None = None) -> None:
    """In the child process: ``RUN OUT STEPS N_EXAMPLES DEVICE``; sweep the run locally (method
    none, one torch thread) and print one JSON line: steps, wall and CPU time, RSS before, at
    peak and after."""
    import torch

    torch.set_num_threads(1)  # as each Ray worker: intra-op threads only add noise on a shared machine
    from circuits.loading import load
    from circuits.manifest import load_manifest
    from circuits.sweep import sweep

    run, out, steps, n, device = argv if argv is not None else sys.argv[1:]
    load(load_manifest(run), 0, device)  # imports and first-load costs out of the measurement
    start_rss, t0, c0 = _rss_mb(), time.perf_counter(), time.process_time()
    study = sweep(run, "induction", out, steps=steps, n_examples=int(n), method="none", device=device,
                  progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # VmHWM: this process's peak RSS. ru_maxrss would not do: Linux carries it over fork and exec,
    # so a child starts with its parent's peak.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"steps": len(study.steps), "wall_s": wall, "cpu_s": cpu, "start_rss_mb": start_rss,
                      "peak_rss_mb": peak, "end_rss_mb": _rss_mb()}))


def _local_sweep_in_child(run: Path, out: Path, steps: str, n_examples: int, device: str) -> dict[str, Any]:
    """A local sweep in a fresh process (``child_main``): its peak RSS is this sweep's alone."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", CHILD, str(run), str(out), steps, str(n_examples), device],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CircuitsError(f"bench scaling: the local sweep failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _warm_ray_workers(ray, workers: int, run: Path, scratch: Path, n_examples: int) -> list[int]:
    """Start ``workers`` worker processes and sweep one step in each (timed as start-up): the first
    step in a fresh process imports torch and TransformerLens and builds what they cache."""

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import torch

        from circuits.sweep import sweep

        torch.set_num_threads(1)
        sweep(run, "induction", scratch / f"warm-{os.getpid()}", steps="0", n_examples=n_examples, method="none",
              progress=False)
        time.sleep(0.5)  # hold the worker so that the next task starts another one
        return os.getpid()

    return sorted(set(ray.get([warm.remote() for _ in range(workers)])))


def _session_cpu() -> float:
    """CPU seconds so far of this process and all its descendants (a local Ray instance's raylet,
    GCS and workers): what the sweep costs the machine, scheduling included."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench_scaling(device: str = "cpu", run: str | None = None, short: int = 10, long: int = 40, ray_steps: int = 40,
                  workers: int = 2, n_examples: int = 8, rounds: int = 3) -> dict[str, Any]:
    """Sweeps of the built-in induction run (trained here unless ``run`` is given), method none,
    ``n_examples`` prompts, default hooks, model loading and writing included:

    - local executor, ``short`` and ``long`` steps, each in a fresh process with one torch
      thread: wall and CPU time per step, peak RSS (``VmHWM``) and its rise over the RSS
      before the sweep (imports and a first load done);
    - Ray (a local instance, each worker one torch thread): ``ray_steps`` steps with 1 worker,
      then with ``workers``, ``rounds`` times alternated (medians); efficiency = steps/s(N) / (N x steps/s(1)). Ray's start-up (``ray.init``)
      and the workers' warm-up (one step swept in each fresh worker process: imports of torch and
      TransformerLens, first-call caches) are reported beside it.
      On a shared machine, the CPU-time figure (task CPU seconds per step with 1 worker over that
      with N) says what wall-clock cannot: whether running N at once costs more per step.
    """
    from circuits.executors import RayExecutor

    context: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="circuits-bench-scaling-") as tmp:
        root = Path(tmp)
        run_dir = induction_run(run, root, context)
        local = {n: _local_sweep_in_child(run_dir, root / f"local{n}", f"first:{n}", n_examples, device)
                 for n in (short, long)}

        import ray

        started_here = not ray.is_initialized()
        t0 = time.perf_counter()
        if started_here:
            ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pids = _warm_ray_workers(ray, workers, run_dir, root, n_examples)
        warm_s = time.perf_counter() - t0
        from circuits.sweep import sweep

        # The driver too: its first sweep would import TransformerLens inside the 1-worker timing.
        sweep(run_dir, "induction", root / "warm-driver", steps="0", n_examples=n_examples, method="none", progress=False)

        rounds_of: dict[int, list[dict[str, Any]]] = {1: [], workers: []}
        try:
            for r in range(rounds):  # alternated, so that a change of load hits both alike
                for n_workers in (1, workers):
                    # On CUDA the workers share the GPU(s): a whole GPU per task would serialise them.
                    share = (ray.cluster_resources().get("GPU", 0) / workers) if device.startswith("cuda") else None
                    executor = RayExecutor(workers=n_workers, device=device, num_gpus=share)
                    t0, c0, s0 = time.perf_counter(), time.process_time(), _session_cpu()
                    sweep(run_dir, "induction", root / f"ray{n_workers}-{r}", steps=f"first:{ray_steps}",
                          n_examples=n_examples, method="none", device=device, progress=False, executor=executor)
                    rounds_of[n_workers].append({
                        "wall_s": time.perf_counter() - t0, "driver_cpu_s": time.process_time() - c0,
                        "session_cpu_s": _session_cpu() - s0,
                        "task_cpu_s": sum(x.cpu_seconds for x in executor.results),
                        "task_wall_s": sum(x.seconds for x in executor.results),
                        "pids": sorted({x.pid for x in executor.results}),
                    })
        finally:
            if started_here:
                ray.shutdown()
        ray_runs = {w: {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "pids"}
                    | {"pids": runs[-1]["pids"], "rounds_wall_s": [round(x["wall_s"], 3) for x in runs]}
                    for w, runs in rounds_of.items()}

    per_step = {n: local[n]["wall_s"] / n for n in local}
    cpu_per_step = {n: local[n]["cpu_s"] / n for n in local}
    growth = {n: local[n]["peak_rss_mb"] - local[n]["start_rss_mb"] for n in local}
    sps = {w: ray_steps / r["wall_s"] for w, r in ray_runs.items()}
    task_cpu = {w: r["task_cpu_s"] / ray_steps for w, r in ray_runs.items()}
    return {
        "figures": {
            f"time per step, {long} / {short} steps (wall)": figure(per_step[long] / per_step[short], "x", goal=1.2),
            f"time per step, {long} / {short} steps (CPU)": figure(cpu_per_step[long] / cpu_per_step[short], "x",
                                                                 goal=1.2),
            f"peak RSS, {long} / {short} steps": figure(local[long]["peak_rss_mb"] / local[short]["peak_rss_mb"], "x",
                                                       goal=1.1),
            f"peak RSS {short} steps": figure(local[short]["peak_rss_mb"], "MiB"),
            f"peak RSS {long} steps": figure(local[long]["peak_rss_mb"], "MiB"),
            f"RSS growth during sweep, {short} steps": figure(growth[short], "MiB"),
            f"RSS growth during sweep, {long} steps": figure(growth[long], "MiB"),
            "local steps/s": figure(long / local[long]["wall_s"], "steps/s", better="higher"),
            "ray steps/s, 1 worker": figure(sps[1], "steps/s", better="higher"),
            f"ray steps/s, {workers} workers": figure(sps[workers], "steps/s", better="higher"),
            f"efficiency {workers} workers (wall)": figure(sps[workers] / (workers * sps[1]), "", goal=0.75,
                                                           better="higher"),
            f"efficiency {workers} workers (task CPU/step)": figure(task_cpu[1] / task_cpu[workers], "", goal=0.75,
                                                                    better="higher"),
            f"efficiency {workers} workers (all Ray CPU/step)": figure(
                ray_runs[1]["session_cpu_s"] / ray_runs[workers]["session_cpu_s"], "", goal=0.75, better="higher"),
            "cores obtained, 1 worker": figure(ray_runs[1]["session_cpu_s"] / ray_runs[1]["wall_s"], "cores"),
            f"cores obtained, {workers} workers": figure(
                ray_runs[workers]["session_cpu_s"] / ray_runs[workers]["wall_s"], "cores"),
            f"ray {workers} workers / local (wall)": figure(sps[workers] * local[long]["wall_s"] / long, "x",
                                                            better="higher"),
            "ray start-up (ray.init)": figure(init_s, "s"),
            "ray worker warm-up (imports)": figure(warm_s, "s"),
        },
        "model": {"run": "built-in induction (2-layer attn-only d64)", "method": "none", "hooks": "default",
                  "n_examples": n_examples, "device": device, **context},
        "batch": {"local_steps": [short, long], "ray_steps": ray_steps, "workers": workers, "rounds": rounds,
                  "ray_worker_pids": pids},
        "local": local,
        "ray": {str(w): r | {"task_cpu_s_per_step": task_cpu[w]} for w, r in ray_runs.items()},
    }

