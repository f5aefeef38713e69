"""Benchmarks: named, registered, each returning figures compared with a goal.

A benchmark is ``fn(**options) -> dict`` registered with ``@benchmark(name, description)``;
its result holds ``figures`` ({name: {value, unit, goal, better}}) plus free-form context
(the model, the batch, the machine). ``circuits bench NAME [--json]`` runs one and prints a
table (or JSON). Figures are measured side by side in one process, so ratios are meaningful
even on a busy machine; absolute times are not. Results go in ``docs/performance.md``.

To add one::

    @benchmark("discover", "EAP scoring time / forward time")
    def bench_discover(quick: bool = False) -> dict:
        ...
        return {"figures": {"eap_over_forward": figure(ratio, "x", goal=4.0)}, "model": {...}}
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits.errors import CircuitsError


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[..., dict[str, Any]]


BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str, description: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Register ``fn`` as the benchmark ``name`` (``circuits bench NAME``)."""

    def decorate(fn: Callable[..., dict]) -> Callable[..., dict]:
        BENCHMARKS[name] = Benchmark(name, description, fn)
        return fn

    return decorate


def figure(value: float, unit: str, goal: float | None = None, better: str = "lower") -> dict[str, Any]:
    """One measured figure; ``ok`` says whether it meets ``goal`` (lower or higher is better)."""
    ok = None if goal is None else (value <= goal if better == "lower" else value >= goal)
    return {"value": float(value), "unit": unit, "goal": goal, "better": better, "ok": ok}


def machine() -> dict[str, Any]:
    """Where the figures were measured: CPU model, cores, torch threads, GPU if used."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__}


def run_benchmark(name: str, **options: Any) -> dict[str, Any]:
    if name not in BENCHMARKS:
        raise CircuitsError(f"unknown benchmark {name!r}; expected one of: {', '.join(sorted(BENCHMARKS))}")
    started = time.perf_counter()
    result = BENCHMARKS[name].run(**options)
    return {"benchmark": name, "description": BENCHMARKS[name].description, **result,
            "machine": machine(), "seconds": round(time.perf_counter() - started, 1)}


def print_result(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench {result['benchmark']}: {result['description']}")
    several = "results" in result  # `bench all`: one row per figure of every benchmark
    for column in ("benchmark", "figure", "value", "goal", "ok") if several else ("figure", "value", "goal", "ok"):
        table.add_column(column, justify="left" if column in ("benchmark", "figure") else "right")
    for key, fig in result["figures"].items():
        goal = "" if fig["goal"] is None else f"{'<=' if fig['better'] == 'lower' else '>='} {fig['goal']:g}"
        ok = "" if fig["ok"] is None else ("[green]yes[/]" if fig["ok"] else "[red]no[/]")
        row = [*key.split(": ", 1)] if several else [key]
        table.add_row(*row, f"{fig['value']:.4g} {fig['unit']}", goal, ok)
    for name, sub in result.get("results", {}).items():
        if "error" in sub:
            table.add_row(name, "[red]failed[/]", sub["error"][:80], "", "")
    console = Console()
    console.print(table)
    for name, sub in result.get("results", {}).items():
        console.print(f"{name}: {sub.get('seconds', '?')} s" + (f"; model: {sub['model']}" if "model" in sub else ""))
    for key in ("model", "batch"):
        if key in result:
            console.print(f"{key}: {result[key]}")
    m = result["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
                  f"load {m['load_avg_1m']}; {result['seconds']} s")


# ---------------------------------------------------------------- extract

SERIAL_ROUNDS = 3  # the serial variant is context, not a goal: time it in the first rounds only
EXTRACT_MODEL = {
    "d_model": 128, "n_layers": 2, "n_heads": 4, "d_head": 32, "d_mlp": 512, "n_ctx": 128, "d_vocab": 1024,
    "attn_only": False, "normalization_type": "LN", "act_fn": "gelu", "positional_embedding_type": "standard",
    "seed": 0,
}


# Pythia-70m's architecture (EleutherAI/pythia-70m config.json), random weights.
PYTHIA_70M_SHAPE = {"vocab_size": 50304, "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
                    "intermediate_size": 2048, "max_position_embeddings": 2048, "rotary_pct": 0.25,
                    "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu"}


def _extract_model(manifest: str | None, step: int | None, device: str, shape: str = "tiny"):
    """The benchmark's checkpoint: a user's (manifest, step), a 2-layer d128 native model
    (``shape="tiny"``) or a Pythia-70m-shaped GPTNeoX (``shape="pythia-70m"``)."""
    if shape == "pythia-70m":
        from circuits.loading import random_gptneox

        return random_gptneox(device, **PYTHIA_70M_SHAPE), "GPTNeoX shaped as Pythia-70m (random init, local folder)"
    if manifest is not None:
        from circuits.loading import load
        from circuits.manifest import load_manifest

        m = load_manifest(manifest)
        step = m.steps[-1] if step is None else step
        return load(m, step, device), f"{m.name}@{step}"
    from circuits.checkpoint import bridge_native_module, new_native_model

    module = new_native_model(EXTRACT_MODEL).to(device).eval()
    return bridge_native_module(module, EXTRACT_MODEL, name="bench-extract"), "native 2-layer d128 (random init)"


@benchmark("extract", "cache + compressed write of one step vs a bare forward; bytes; one-head read")
def bench_extract(batch: int = 64, seq: int = 128, n_batches: int = 4, rounds: int = 9, dtype: str = "float16",
                  manifest: str | None = None, step: int | None = None, device: str = "cpu",
                  hooks: str | None = None, shape: str = "tiny") -> dict[str, Any]:
    """Per round, on the same checkpoint and batches: the bare forward of every batch, the
    sweep's extraction of them (patterns and hooks cached, logits only at the answer position
    as the sweep does, float16, chunks compressed on a thread pool and written on the writer
    thread while the next batch runs, shard landed), and in the first
    rounds the same extraction writing serially (each batch's write awaited before the next
    forward). Each figure is the median over rounds of that round's ratio, in wall-clock and in
    process CPU time (CPU time is the honest cost when other processes share the cores;
    wall-clock shows the overlap). Then the stored/raw bytes of patterns and activations, and
    the time to read one head's pattern at one step from ``index.h5`` with h5py."""
    import h5py
    import numpy as np
    import torch

    from circuits import store
    from circuits.sweep import DTYPES, cache_batch, resolve_hooks

    model, label = _extract_model(manifest, step, device, shape)
    cfg = model.cfg
    seq = min(seq, cfg.n_ctx)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.d_vocab, (batch, seq), generator=gen).to(device) for _ in range(n_batches)]
    hook_names = resolve_hooks(model, hooks)
    torch_dtype = DTYPES[dtype][0]
    # As in the sweep, logits are unembedded only where a task reads them: here the last token.
    answer_position = torch.tensor([seq - 1], device=device)
    n_examples = batch * n_batches

    def bare() -> None:
        with torch.no_grad():
            for tokens in batches:
                model(tokens)

    def extract(final: Path, writer: store.BackgroundWriter, serial: bool = False) -> Path:
        shard = store.ShardWriter(final, n_examples, batch, writer)
        for i, tokens in enumerate(batches):
            with torch.no_grad():
                _, _, arrays = cache_batch(model, tokens, hook_names, torch_dtype, answer_position)
            shard.write_batch(i * batch, arrays)
            if serial:
                writer.wait()
        shard.finish({"step": 0, "tokens_seen": 0})
        writer.wait()
        return final

    times: dict[str, list[float]] = {"bare": [], "extract": [], "serial": []}
    cpu: dict[str, list[float]] = {"bare": [], "extract": [], "serial": []}
    with tempfile.TemporaryDirectory(prefix="circuits-bench-") as tmp, store.BackgroundWriter() as writer:
        root = Path(tmp)
        (root / store.SHARD_DIR).mkdir()
        shard_path = root / store.SHARD_DIR / store.shard_name(0)
        # Timed shards land under a name not yet taken, as in the sweep: replacing a file already
        # there would time the file system freeing it (~20 ms for 30 MB on ext4).
        landing = shard_path.with_name("landing.h5")
        bare()  # warm-up: first calls allocate and pick kernels
        extract(shard_path, writer)
        for r in range(rounds):
            # Each round times every kind back to back, in an order that alternates between
            # rounds, and the figures are medians of per-round ratios: a change of machine
            # speed (frequency, neighbours) then hits the numerator and denominator alike.
            kinds = ["bare", "extract"] + (["serial"] if r < SERIAL_ROUNDS else [])
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "bare":
                    bare()
                else:
                    extract(landing, writer, serial=kind == "serial")
                times[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
                landing.unlink(missing_ok=True)
        with h5py.File(shard_path, "r") as f:
            # Raw = what the cache holds in float32: each pattern as its whole [q, k] square,
            # although only the causal lower triangle is stored.
            stored = {name: f[name].id.get_storage_size()
                      for name in [store.PATTERNS] + [f"activations/{h}" for h in hook_names]}
            raw = {name: (f[name].size // f[name].shape[-1] * seq * seq if name == store.PATTERNS else f[name].size) * 4
                   for name in stored}
            file_bytes = shard_path.stat().st_size
        layouts, tokens, _ = store.shard_layouts([(0, shard_path)])
        store.write_index(root, layouts, tokens, {"bench": "extract"})
        rng = np.random.default_rng(0)
        picks = [(int(rng.integers(cfg.n_layers)), int(rng.integers(cfg.n_heads)), int(rng.integers(n_examples)))
                 for _ in range(200)]
        with h5py.File(root / store.INDEX_FILE, "r") as index:
            patterns = index[store.PATTERNS]
            patterns[0, 0, 0, 0]  # opens the shard behind the virtual dataset
            reads = []
            for layer, head, example in picks:
                t0 = time.perf_counter()
                patterns[0, example, layer, head].astype(np.float32)
                reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with h5py.File(root / store.INDEX_FILE, "r") as index:
            index[store.PATTERNS][0, 1, 1, 1]
        cold = time.perf_counter() - t0

    def ratio(of: str, clock: dict[str, list[float]]) -> float:
        return statistics.median(t / b for t, b in zip(clock[of], clock["bare"], strict=False))

    return {
        "figures": {
            "extract_over_forward": figure(ratio("extract", times), "x", goal=1.3),
            "stored_over_raw_f32": figure(sum(stored.values()) / sum(raw.values()), "", goal=0.3),
            "patterns_stored_over_raw_f32": figure(stored[store.PATTERNS] / raw[store.PATTERNS], ""),
            "read_one_head_ms": figure(statistics.median(reads) * 1e3, "ms", goal=5.0),
            "read_one_head_cold_ms": figure(cold * 1e3, "ms"),
            "serial_write_over_forward": figure(ratio("serial", times), "x"),
            "extract_cpu_over_forward_cpu": figure(ratio("extract", cpu), "x"),
            "bare_forward_s": figure(statistics.median(times["bare"]), "s"),
            "extract_s": figure(statistics.median(times["extract"]), "s"),
        },
        "model": {"checkpoint": label, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
                  "n_ctx": cfg.n_ctx, "d_vocab": cfg.d_vocab},
        "batch": {"batch": batch, "seq": seq, "n_batches": n_batches, "rounds": rounds, "dtype": dtype,
                  "hooks": hook_names, "compression": store.COMPRESSION_NAME, "stored_bytes": sum(stored.values()),
                  "raw_f32_bytes": sum(raw.values()), "shard_file_bytes": int(file_bytes)},
        "times_s": {k: [round(v, 4) for v in vals] for k, vals in times.items()},
        "cpu_s": {k: [round(v, 4) for v in vals] for k, vals in cpu.items()},
    }


@benchmark("extract-70m", "the extract benchmark on a Pythia-70m-shaped model (smaller batches)")
def bench_extract_70m(device: str = "cpu") -> dict[str, Any]:
    """``extract`` where the forward is the size users sweep (Pythia-70m), 2 x 16 x 128 tokens."""
    return bench_extract(batch=16, n_batches=2, rounds=5, device=device, shape="pythia-70m")


# ---------------------------------------------------------------- discover, app (written elsewhere)


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a benchmark that prints its own summary, keeping stdout for our table."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


@benchmark("discover", "EAP / EAP-IG scoring vs forward+backward, faithfulness, TL 4.3 attribution patching (CPU time)")
def discover_figures(device: str = "cpu") -> dict[str, Any]:
    """``circuits.discovery.bench.bench_discover`` (CPU only, one torch thread), as figures."""
    from circuits.discovery.bench import bench_discover as run

    raw = _quietly(run)
    figures = {}
    for key, value in raw["ratios"].items():
        if key.endswith("goal (m+2)"):
            continue
        goal = raw["ratios"].get(key.replace("/ fwd+bwd", "goal (m+2)")) if key.startswith("eap-ig") else None
        better = "higher" if "speed-up" in key else "lower"
        figures[key] = figure(value, "x", goal=goal, better=better)
    if "eap_vs_tl_max_rel_err" in raw:
        figures["eap vs TL max rel err"] = figure(raw["eap_vs_tl_max_rel_err"], "", goal=1e-4)
    note = "" if device == "cpu" else f" (--device {device} ignored: this benchmark runs on the CPU)"
    return {"figures": figures, "model": raw["model"] | {"note": f"CPU time, 1 thread{note}"}, "batch": raw["batch"],
            "seconds_cpu": raw["seconds"]}


@benchmark("app", "app server side: open a 154-step study, switch step (AppTest, whole-page rerun)")
def app_figures(device: str = "cpu") -> dict[str, Any]:
    """``circuits.app_bench.bench_app`` on its synthetic Pythia-70m-shaped study, as figures.

    That module drives ``app/main.py`` by file path, so the library never imports ``app/``.
    """
    from circuits.app_bench import bench_app as run

    raw = _quietly(run)
    return {
        "figures": {
            "step_switch_ms": figure(raw["step_switch_ms_median"], "ms", goal=raw["goal_step_switch_ms"]),
            "step_switch_ms_max": figure(raw["step_switch_ms_max"], "ms"),
            "open_circuit_s": figure(raw["open_s_median"], "s", goal=raw["goal_open_s"]),
            "open_overview_s": figure(raw["open_overview_s"], "s", goal=raw["goal_open_s"]),
        },
        "model": {"study": f"synthetic, {raw['n_steps']} steps, ~{raw['edges_drawn_last']} edges drawn",
                  "device": "cpu (the app reads the study; no model)"},
    }


# ---------------------------------------------------------------- scaling

_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)  # as each Ray worker: intra-op threads only add noise on a shared machine
from circuits.sweep import sweep
from circuits.loading import load
from circuits.manifest import load_manifest
run, out, steps, n, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
load(load_manifest(run), 0, device)  # imports and first-load costs out of the measurement
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
start_rss, t0, c0 = rss_mb(), time.perf_counter(), time.process_time()
study = sweep(run, "induction", out, steps=steps, n_examples=n, method="none", device=device, progress=False)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
# VmHWM: this process's peak RSS. ru_maxrss would not do: Linux carries it over fork and exec,
# so a child starts with its parent's peak.
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"steps": len(study.steps), "wall_s": wall, "cpu_s": cpu, "start_rss_mb": start_rss,
                  "peak_rss_mb": peak, "end_rss_mb": rss_mb()}))
"""


def _local_sweep_in_child(run: Path, out: Path, steps: str, n_examples: int, device: str) -> dict[str, Any]:
    """A local sweep in a fresh process: its peak RSS is this sweep's alone."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CHILD, str(run), str(out), steps, str(n_examples), device],
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


@benchmark("scaling", "sweep time and peak memory over 10 vs 40 steps (local); steps/s with 1 vs 2 Ray workers")
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
        if run is None:
            from circuits.recipes import train_recipe

            t0 = time.perf_counter()
            train_recipe("induction", root / "run", progress=False)
            context["train_s"] = round(time.perf_counter() - t0, 1)
            run = root / "run"
        run = Path(run)
        local = {n: _local_sweep_in_child(run, root / f"local{n}", f"first:{n}", n_examples, device)
                 for n in (short, long)}

        import ray

        started_here = not ray.is_initialized()
        t0 = time.perf_counter()
        if started_here:
            ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pids = _warm_ray_workers(ray, workers, run, root, n_examples)
        warm_s = time.perf_counter() - t0
        from circuits.sweep import sweep

        # The driver too: its first sweep would import TransformerLens inside the 1-worker timing.
        sweep(run, "induction", root / "warm-driver", steps="0", n_examples=n_examples, method="none", progress=False)

        rounds_of: dict[int, list[dict[str, Any]]] = {1: [], workers: []}
        try:
            for r in range(rounds):  # alternated, so that a change of load hits both alike
                for n_workers in (1, workers):
                    # On CUDA the workers share the GPU(s): a whole GPU per task would serialise them.
                    share = (ray.cluster_resources().get("GPU", 0) / workers) if device.startswith("cuda") else None
                    executor = RayExecutor(workers=n_workers, device=device, num_gpus=share)
                    t0, c0, s0 = time.perf_counter(), time.process_time(), _session_cpu()
                    sweep(run, "induction", root / f"ray{n_workers}-{r}", steps=f"first:{ray_steps}",
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


# ---------------------------------------------------------------- all


_OPTIONS_OF = {"extract": ("manifest", "step"), "scaling": ("run",)}


@benchmark("all", "every benchmark, one run, figures side by side")
def bench_all(device: str = "cpu", **options: Any) -> dict[str, Any]:
    """Run every other registered benchmark in turn; one that fails is reported, not fatal."""
    results: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    for name in [n for n in BENCHMARKS if n != "all"]:
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
