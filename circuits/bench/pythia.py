"""Benchmark ``pythia``: one sweep step at Pythia's shapes, with a circuit to search for.

What a user pays per checkpoint when sweeping Pythia with ``--method eap-ig``: one step of the
sweep (EAP-IG(5), the induction task's 32 prompts x 33 tokens, default hooks, and the defaults
otherwise: bootstrap, node effects, trust check), model load included, measured in a fresh
process. Figures: time per step (wall and CPU), peak RSS of the step (``VmHWM``, reset when the
step starts), shard bytes on disk, and each phase of ``circuits.timing`` (load, forward,
extract, score, select, faithfulness, write, and each analysis's own time) as a share of it.

A random-init model has a nil clean-corrupted gap, so its step skips the faithful search. The
benchmark's checkpoint is therefore a GPTNeoX of Pythia's shape (``SHAPES``) trained briefly on
repeated random tokens, the induction task's distribution (``train_checkpoint``), and cached as
a local run (``cache_root()``) for later runs. The result says whether the gap was nil.

With ``eap_ig_python`` (a Python whose environment has TransformerLens 2.x and the EAP-IG
library, hannamw/EAP-IG), ``eap_ig_driver.py`` runs there on the same weights and prompts and
the result gives our figures over theirs. It is never needed by the tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from circuits.bench.common import figure
from circuits.bench.extract import GPTNeoXShape
from circuits.errors import CircuitsError

CHILD = "from circuits.bench.pythia import child_main; child_main()"  # the child's whole program
DRIVER = Path(__file__).with_name("eap_ig_driver.py")  # run by --eap-ig-python, as a script

_PYTHIA: dict[str, Any] = {"vocab_size": 50304, "max_position_embeddings": 2048, "rotary_pct": 0.25,
                           "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu"}


def _shape(hidden: int, layers: int, heads: int, mlp: int, **more: Any) -> GPTNeoXShape:
    return GPTNeoXShape(**(_PYTHIA | {"hidden_size": hidden, "num_hidden_layers": layers,  # type: ignore[typeddict-item]
                                      "num_attention_heads": heads, "intermediate_size": mlp} | more))


# EleutherAI/pythia-{160m,410m,1b} config.json; "tiny" is for the tests (seconds, not minutes).
SHAPES: dict[str, GPTNeoXShape] = {
    "tiny": _shape(64, 2, 4, 256, vocab_size=512, max_position_embeddings=64),
    "160m": _shape(768, 12, 12, 3072),
    "410m": _shape(1024, 24, 16, 4096),
    "1b": _shape(2048, 16, 8, 8192),
}
GOALS: dict[str, dict[str, float]] = {  # issue 15: 2 cores, 32 prompts x 33 tokens, EAP-IG(5)
    "160m": {"step_s": 60.0, "peak_rss_gib": 2.5, "shard_mb": 40.0},
    "410m": {"peak_rss_gib": 8.0},
}
HALF_LEN = 16  # the induction task's prompts: BOS + 16 random tokens, repeated (33 tokens)
TRAIN = {"lr": 1e-3, "batch": 8}  # the recipe (AdamW, no weight decay); the steps are TRAIN_STEPS[size]
TRAIN_STEPS = {"tiny": 10, "160m": 4, "410m": 4, "1b": 4}  # the default of ``train_steps``
SEED_OFFSET = 7_000  # training batches are drawn from another stream than the task's prompts


def cache_root() -> Path:
    """Where trained benchmark checkpoints are kept: ``$CIRCUITS_BENCH_CACHE``, else
    ``$XDG_CACHE_HOME/circuits/bench``, else ``~/.cache/circuits/bench``."""
    if os.environ.get("CIRCUITS_BENCH_CACHE"):
        return Path(os.environ["CIRCUITS_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "circuits" / "bench"


def _check_size(size: str) -> GPTNeoXShape:
    if size not in SHAPES:
        raise CircuitsError(f"bench pythia: unknown --size {size!r}; expected one of: {', '.join(SHAPES)}")
    return SHAPES[size]


def _set_bag_of_context(model, shape: GPTNeoXShape) -> None:
    """The two set weights of ``train_checkpoint``'s start: unembedding = embedding, layer 0's
    attention uniform with value-output the identity (HF GPTNeoX packs each head's q, k, v rows
    one after the other in ``query_key_value``)."""
    import torch

    d_model, n_heads = shape["hidden_size"], shape["num_attention_heads"]
    d_head = d_model // n_heads
    attention = model.gpt_neox.layers[0].attention
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
        qkv = attention.query_key_value.weight.view(n_heads, 3, d_head, d_model)
        qkv.zero_()
        attention.query_key_value.bias.zero_()
        qkv[:, 2] = torch.eye(d_model).view(n_heads, d_head, d_model)  # head h's value: residual dims of slice h
        attention.dense.weight.copy_(torch.eye(d_model))
        attention.dense.bias.zero_()


def train_checkpoint(size: str, steps: int, seed: int, device: str, cache: Path | None = None) -> tuple[Path, dict]:
    """The run folder of a GPTNeoX shaped as ``size``, trained ``steps`` AdamW steps on repeated
    random tokens (loss on the repeated half only: what induction predicts), saved as the local
    run's only step; made once and reused. Returns the folder and its ``train.json``.

    A random init has a nil gap, and brief training alone does not make one at these shapes
    (tried at 160m: 12 AdamW steps of 8 x 33 tokens, lr 1e-3 or 3e-3, with or without the
    unembedding below, left the gap within noise). So training starts from two set weights:
    the unembedding is a copy of the embedding (untied, a parameter of its own as in Pythia),
    and layer 0's attention is a bag of the context (queries and keys zero, so attention is
    uniform over the causal window; each head's value reads its own d_head slice of the
    residual and the output projection is the identity, so the heads together add the mean of
    the context's normalised embeddings). The logits of tokens seen in context rise: the clean
    prompt has seen each answer, the corrupted one has not (gap ~0.19 at 160m, ~50 standard
    errors; 4 AdamW steps at lr 1e-3 then leave ~0.08, ~40 standard errors).
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from circuits.manifest import parse_manifest
    from circuits.recipes.induction import repeated_tokens

    shape = _check_size(size)
    if steps < 1:
        raise CircuitsError(f"bench pythia: --train-steps {steps}: must be at least 1 (a random init has a nil gap)")
    root = cache_root() if cache is None else Path(cache)
    run = root / f"pythia-{size}-induction-s{seed}-t{steps}"
    recipe = {"size": size, "shape": dict(shape), "seed": seed, "steps": steps, "lr": TRAIN["lr"],
              "batch": TRAIN["batch"], "half_len": HALF_LEN, "loss": "repeated half only",
              "init": "unembedding = embedding; layer 0 attention = bag of context"}
    if (run / "train.json").exists() and (run / f"step{steps}" / "model.safetensors").exists():
        made = json.loads((run / "train.json").read_text())
        if made.get("recipe") == recipe:
            return run, made | {"cached": True}
        raise CircuitsError(f"{run}: holds another benchmark checkpoint; remove the folder to train it again")
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model: Any = GPTNeoXForCausalLM(GPTNeoXConfig(**cast(dict[str, Any], shape)))
    _set_bag_of_context(model, shape)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED_OFFSET + seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        tokens = repeated_tokens(int(TRAIN["batch"]), HALF_LEN, shape["vocab_size"], generator).to(device)
        labels = tokens.clone()
        labels[:, :HALF_LEN + 2] = -100  # HF shifts labels: positions half+1.. predict the repeat's 2nd token on
        loss = model(tokens, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss.detach()), 4))
    made = {"recipe": recipe, "train_s": round(time.perf_counter() - t0, 1), "losses": losses,
            "device": device, "torch": torch.__version__}
    del optimizer  # the step's child process is measured: free the GPU for it
    model.cpu()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    scratch = Path(tempfile.mkdtemp(prefix=f".{run.name}-", dir=root))  # landed by one rename
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
            model.eval().save_pretrained(scratch / f"step{steps}")
        manifest = parse_manifest({"name": run.name, "source": "local", "local": {"path": "."},
                                   "description": f"GPTNeoX shaped as Pythia-{size}, {steps} steps on repeated "
                                                  "random tokens (circuits bench pythia)",
                                   "tokens_per_step": int(TRAIN["batch"]) * (2 * HALF_LEN + 1),
                                   "steps": [steps]}, origin="<bench pythia>")
        (scratch / "manifest.yaml").write_text(manifest.to_yaml())
        (scratch / "train.json").write_text(json.dumps(made, indent=1))
        if run.exists():  # a half-made folder of an interrupted run
            shutil.rmtree(run)
        scratch.rename(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return run, made | {"cached": False}


# ---------------------------------------------------------------- the child process


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(f"{field}:"))


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _OneStep:
    """A sweep executor that runs its one step as a Ray worker does (``run_step``: load, visit,
    write, land) and measures it: clocks, phases, RSS, GPU memory."""

    name = "bench-one-step"
    workers = 1

    def __init__(self, device: str) -> None:
        self.device = device
        self.measured: dict[str, Any] = {}

    def run(self, spec, steps, landed, started=lambda step: None, model=None) -> list:
        import gc

        import torch

        from circuits.executors import run_step
        from circuits.timing import recording

        (step,) = steps
        del model  # None: the sweep keeps no probe model for an executor that is not local
        gc.collect()
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        process_peak, start_rss, reset = _status_mb("VmHWM"), _status_mb("VmRSS"), _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        with recording() as seconds:
            result = run_step(spec, step)
            if cuda:
                torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.measured = {"wall_s": wall, "cpu_s": cpu, "start_rss_mb": start_rss, "peak_rss_mb": _status_mb("VmHWM"),
                         "peak_reset": reset, "process_peak_before_mb": process_peak, "phases_s": dict(seconds),
                         "torch_threads": torch.get_num_threads(),
                         "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
        landed(result)
        return [result]

    def close(self) -> None:
        pass


def child_main(argv: list[str] | None = None) -> None:
    """In the child process: one JSON argument ``{run, out, device, n_examples, max_memory}``;
    sweep the run's one step (EAP-IG(5)) and print one JSON line of what it measured."""
    import h5py

    from circuits import store
    from circuits.manifest import load_manifest
    from circuits.sweep import sweep

    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    manifest = load_manifest(args["run"])
    step = manifest.steps[-1]
    executor = _OneStep(args["device"])
    settings = {"max_memory": args["max_memory"]} if args.get("max_memory") else {}
    t0 = time.perf_counter()
    # The sweep first loads the step on the CPU to make the task and study.json (imports and
    # first-call caches too); the executor then runs the step as a worker would, timed.
    sweep(manifest, "induction", args["out"], steps=str(step), n_examples=args["n_examples"], method="eap-ig",
          ig_steps=5, device=args["device"], progress=False, executor=cast(Any, executor), **settings)
    shard = Path(args["out"]) / store.SHARD_DIR / store.shard_name(step)
    with h5py.File(shard, "r") as f:
        circuit = {k: float(f[f"circuit/{k}"][()]) for k in
                   ("faithfulness", "n_edges", "n_edges_total", "metric_clean", "metric_corrupted",
                    "stable_faithfulness")}
    print(json.dumps(executor.measured | {"step": step, "sweep_wall_s": time.perf_counter() - t0,
                                          "shard_bytes": shard.stat().st_size, "circuit": circuit}))


def _run_json(command: list[str], what: str, timeout: float | None = None) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise CircuitsError(f"bench pythia: {what} failed (exit {done.returncode}): {tail[-600:]}")
    return json.loads(lines[-1])


def _eap_ig_library(python: str, run: Path, step: int, device: str, n_examples: int) -> dict[str, Any]:
    """EAP and EAP-IG(5) of the EAP-IG library (``python``'s environment) on the same weights
    and prompts, in its own process: its seconds and peak RSS, or the error it gave."""

    from circuits.tasks import induction_task

    vocab = json.loads((run / f"step{step}" / "config.json").read_text())["vocab_size"]
    task = induction_task(n_examples, half_len=HALF_LEN, vocab=vocab)
    with tempfile.TemporaryDirectory(prefix="circuits-bench-eap-ig-") as tmp:
        prompts = Path(tmp) / "prompts.json"  # plain token ids: nothing the driver loads can run code
        prompts.write_text(json.dumps({"clean": task.clean.tolist(), "corrupted": task.corrupted.tolist(),
                                       "answer_pos": task.answer_pos.tolist(), "correct": task.correct.tolist()}))
        args = {"hf_folder": str(run / f"step{step}"), "prompts": str(prompts), "device": device, "ig_steps": 5}
        try:
            return _run_json([python, str(DRIVER), json.dumps(args)], "the EAP-IG library driver", timeout=3600)
        except (CircuitsError, OSError, subprocess.TimeoutExpired) as err:
            return {"error": str(err)}


def bench_pythia(device: str = "cpu", size: str = "160m", train_steps: int | None = None, seed: int = 0,
                 eap_ig_python: str | None = None, max_memory: str | None = None, n_examples: int = 32,
                 cache: str | None = None) -> dict[str, Any]:
    """One sweep step (EAP-IG(5), induction, defaults) of a GPTNeoX shaped as Pythia-``size``,
    trained ``train_steps`` steps (cached), in a fresh process on ``device``."""
    from circuits.timing import PHASES

    _check_size(size)
    steps = TRAIN_STEPS[size] if train_steps is None else int(train_steps)
    run, trained = train_checkpoint(size, steps, seed, device, None if cache is None else Path(cache))
    args = {"run": str(run), "device": device, "n_examples": n_examples, "max_memory": max_memory}
    with tempfile.TemporaryDirectory(prefix="circuits-bench-pythia-") as tmp:
        measured = _run_json([sys.executable, "-c", CHILD, json.dumps(args | {"out": str(Path(tmp) / "study")})],
                             "the sweep step")
    wall, phases = measured["wall_s"], measured["phases_s"]
    circuit = measured["circuit"]
    searched = math.isfinite(circuit["faithfulness"]) and circuit["n_edges"] > 0
    goals = GOALS.get(size, {})
    figures = {
        "time per step (wall)": figure(wall, "s", goal=goals.get("step_s")),
        "time per step (CPU)": figure(measured["cpu_s"], "s"),
        "peak RSS of the step": figure(measured["peak_rss_mb"] / 1024, "GiB", goal=goals.get("peak_rss_gib")),
        "RSS before the step": figure(measured["start_rss_mb"] / 1024, "GiB"),
        "shard": figure(measured["shard_bytes"] / 1e6, "MB", goal=goals.get("shard_mb")),
        "faithful search ran": figure(float(searched), "", goal=1.0, better="higher"),
    }
    if measured.get("gpu_peak_mb") is not None:
        figures["peak GPU memory"] = figure(measured["gpu_peak_mb"] / 1024, "GiB")
    marked = sum(phases.values())
    shares = {name: phases[name] / wall for name in [*PHASES, *sorted(set(phases) - set(PHASES))] if name in phases}
    shares["unmarked"] = max(wall - marked, 0.0) / wall
    for name, share in shares.items():
        figures[f"share: {name}"] = figure(100 * share, "%")
    library: dict[str, Any] = {"given": False, "note": "EAP-IG library: not given (--eap-ig-python)"}
    if eap_ig_python is not None:
        found = _eap_ig_library(eap_ig_python, run, measured["step"], device, n_examples)
        library = {"given": True, "python": eap_ig_python, **found}
        if "error" not in found:
            theirs = {k: float(found[k]) for k in ("eap_s", "eap_ig_s", "peak_rss_mb")}
            if "score" in phases:
                figures["EAP-IG(5) scoring, ours / library"] = figure(phases["score"] / theirs["eap_ig_s"], "x",
                                                                      goal=1.0)
            else:
                library["note"] = "our scoring time is not known: discovery marks no 'score' phase at this commit"
            figures["peak RSS, our step / library's EAP-IG"] = figure(measured["peak_rss_mb"] / theirs["peak_rss_mb"],
                                                                      "x")
            figures["library EAP-IG(5) / library EAP"] = figure(theirs["eap_ig_s"] / theirs["eap_s"], "x")
    shape = SHAPES[size]
    return {
        "figures": figures,
        "model": {"shape": f"GPTNeoX as Pythia-{size}", "d_model": shape["hidden_size"],
                  "n_layers": shape["num_hidden_layers"], "n_heads": shape["num_attention_heads"],
                  "d_mlp": shape["intermediate_size"], "vocab": shape["vocab_size"], "run": str(run),
                  "checkpoint_step": measured["step"], "device": device,
                  "training": {k: trained[k] for k in ("recipe", "train_s", "cached")} | {
                      "loss_first_last": [trained["losses"][0], trained["losses"][-1]]}},
        "batch": {"task": "induction", "n_examples": n_examples, "tokens": 2 * HALF_LEN + 1, "method": "eap-ig(5)",
                  "hooks": "default", "max_memory": max_memory, "torch_threads": measured["torch_threads"]},
        "gap": {"nil": not searched, "metric_clean": circuit["metric_clean"],
                "metric_corrupted": circuit["metric_corrupted"], "faithfulness": circuit["faithfulness"],
                "n_edges": int(circuit["n_edges"]), "n_edges_total": int(circuit["n_edges_total"])},
        "step": {k: measured[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "start_rss_mb", "peak_reset",
                                          "process_peak_before_mb", "sweep_wall_s", "shard_bytes", "gpu_peak_mb")}
                | {"phases_s": {k: round(v, 3) for k, v in phases.items()}, "unmarked_s": round(wall - marked, 3)},
        "eap_ig_library": library,
    }


def gpu_main(argv: list[str] | None = None) -> None:
    """``make bench-gpu``: ``bench pythia --device cuda`` at each size given (default 160m 410m
    1b), one after the other; all results in one JSON file (the first argument)."""
    import torch

    from circuits.bench import run_benchmark

    out, *sizes = argv if argv is not None else sys.argv[1:]
    if not torch.cuda.is_available():
        raise SystemExit("bench-gpu: torch sees no CUDA device (a CUDA build of torch is needed; "
                         "`make install` pins the CPU one)")
    results: dict[str, Any] = {}
    for size in sizes or ["160m", "410m", "1b"]:
        try:
            results[size] = run_benchmark("pythia", device="cuda", size=size)
        except CircuitsError as err:  # one size that fails (memory, time) must not hide the others
            results[size] = {"error": str(err)}
        Path(out).write_text(json.dumps(results, indent=1, default=str))
        step = results[size].get("step", {})
        print(f"{size}: {step.get('wall_s', float('nan')):.1f} s per step, GPU peak "
              f"{(step.get('gpu_peak_mb') or float('nan')) / 1024:.2f} GiB", flush=True)
