"""The sweep: visit every selected checkpoint once and land one shard per step.

Reads top to bottom as the recipe: ``sweep`` resolves the steps and the study folder, then hands
each pending step to an executor (``circuits.executors``: this process, or Ray tasks), whose
``run_step`` loads the checkpoint, calls ``visit_step`` (the one function later features
extend) and lands the shard; the driver rebuilds the index as each shard lands. Writes run on a
background thread so they overlap the next batch's forward pass; memory is bounded by the
batch (plus at most two batches queued for writing).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuits import store
from circuits.errors import CircuitsError
from circuits.executors import (
    FAULT_ENV,
    LocalExecutor,
    StepResult,
    StepSpec,
    check_executor,
    make_executor,
)
from circuits.manifest import Manifest, load_manifest
from circuits.steps import select_steps
from circuits.tasks import Task, answer_logits, at_answer_positions, make_task, metric_per_example
from circuits.visit import Analysis, VisitContext

DEFAULT_HOOKS = "blocks.*.hook_resid_post,blocks.*.attn.hook_z"
DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}
METHODS = ("none", "eap", "eap-ig", "patching")
INDEX_THROTTLE = 10.0  # rebuild index.h5 when a shard lands if the last rebuild is older than 10x its duration


# ---------------------------------------------------------------- helpers


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def resolve_hooks(model, spec: str | Sequence[str] | None) -> list[str]:
    """Hook names selected by a filter: comma-separated names or globs (``blocks.*.hook_resid_post``).

    ``none`` (or an empty filter) caches no activation besides the attention patterns, which
    are always stored (under ``patterns``, not as activations).
    """
    spec = DEFAULT_HOOKS if spec is None else spec
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if parts in ([], ["none"]):
        return []
    valid = list(model.hook_dict)
    chosen: list[str] = []
    for part in parts:
        hits = [name for name in valid if fnmatch.fnmatchcase(name, part)]
        if not hits:
            examples = [n for n in ("blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.hook_resid_pre",
                                    "hook_embed", "blocks.0.attn.hook_pattern") if n in valid]
            raise CircuitsError(
                f"hook filter: {part!r} matches no hook of this model ({len(valid)} hooks); valid names include "
                f"{', '.join(examples or valid[:5])}; globs such as 'blocks.*.hook_resid_post' work too"
            )
        chosen += [h for h in hits if h not in chosen]
    patterns = {pattern_hook(layer) for layer in range(model.cfg.n_layers)}
    return sorted((h for h in chosen if h not in patterns), key=_hook_order(valid))


def _hook_order(valid: list[str]) -> Callable[[str], int]:
    position = {name: i for i, name in enumerate(valid)}
    return lambda name: position.get(name, len(position))


def library_versions() -> dict[str, str]:
    import h5py
    import hdf5plugin
    import transformer_lens

    import circuits

    return {"circuits": circuits.__version__, "torch": torch.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
            "h5py": h5py.__version__, "hdf5plugin": hdf5plugin.version, "numpy": np.__version__}


def task_record(task: Task) -> dict[str, Any]:
    return {
        "name": task.name, "prompt_hash": task.prompt_hash(), "metric": task.metric,
        "n_examples": task.n_examples, "seq_len": task.seq_len, "n_answers": int(task.answer_pos.shape[-1]),
        "options": dict(task.options), "prompts": list(task.prompts),
        "arrays": {k: v.tolist() for k, v in store.task_arrays(task).items()},
    }


def _check_writable(out: Path) -> None:
    try:
        (out / store.SHARD_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / store.SHARD_DIR / f".write-probe-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CircuitsError(f"--out {out}: cannot write the study there ({err.strerror or err})") from None


def _refuse_mismatch(out: Path, existing: dict[str, Any], field: str, ours: Any, theirs: Any, hint: str) -> None:
    if ours != theirs:
        raise CircuitsError(
            f"{out}: this study was made with another {field} ({_short(theirs)}, this sweep: {_short(ours)}); "
            f"{hint} or sweep into another --out"
        )


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(str(text).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _landed_shards(out: Path, selected: list[int]) -> tuple[set[int], dict, dict, dict[int, Path]]:
    """(complete selected steps, layouts, tokens seen, damaged shards) of the shards already there."""
    found = store.scan_shards(out)
    layouts, tokens, problems = store.shard_layouts(found.items())
    return set(layouts) & set(selected), layouts, tokens, {s: found[s] for s in problems if s in selected}


def _move_aside(damaged: dict[int, Path]) -> None:
    """Damaged or unmarked shards are not data: keep them as ``.corrupt`` and redo their steps."""
    import warnings

    for step, path in damaged.items():
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        warnings.warn(f"{path}: not a complete shard; moved to {aside.name}, step {step} will be redone",
                      stacklevel=3)


# ---------------------------------------------------------------- the per-step visit


def visit_step(
    model,
    task: Task,
    manifest: Manifest,
    step: int,
    shard: store.ShardWriter,
    *,
    hooks: list[str],
    dtype: str = "float16",
    batch_size: int = 32,
    device: str = "cpu",
    analyses: Sequence[tuple[str, Analysis]] = (),
    options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Everything done with one loaded checkpoint; writes go to ``shard`` (not yet finished).

    Clean and corrupted prompts run batch by batch: the clean run caches attention patterns
    (all layers and heads) and ``hooks``; both runs give the answer logits, per-example loss
    and metric. Then every analysis gets a VisitContext and its dict lands under
    ``/{name}/{key}``. Returns the step's mean metrics (for the progress bar).
    """
    torch_dtype, _ = DTYPES[dtype]
    shard.write_static({f"task/{k}": v for k, v in store.task_arrays(task).items()})
    sums = {"metric_clean": 0.0, "metric_corrupted": 0.0, "loss_clean": 0.0}
    whole_cache = None
    for start in range(0, task.n_examples, batch_size):
        sub = task.slice(start, min(start + batch_size, task.n_examples))
        positions, at_answers = at_answer_positions(sub)
        positions = positions.to(device)
        with torch.no_grad():
            logits_clean, cache, arrays = cache_batch(model, sub.clean.to(device), hooks, torch_dtype, positions)
            logits_corrupt = forward_at(model, sub.corrupted.to(device), positions)
            outputs = _outputs(logits_clean, logits_corrupt, at_answers)
        arrays |= {f"outputs/{k}": v for k, v in outputs.items()}
        shard.write_batch(start, arrays)
        for key in sums:
            sums[key] += float(outputs[key].sum())
        if start == 0 and task.n_examples <= batch_size:
            whole_cache = cache
        del cache, logits_clean, logits_corrupt
    ctx = VisitContext(model=model, task=task, manifest=manifest, step=step, device=device,
                       cache=whole_cache, options=dict(options or {}))
    for name, analysis in analyses:
        shard.write_static(_analysis_arrays(name, analysis(ctx)))
    return {k: v / task.n_examples for k, v in sums.items()}


class _LastBlockDone(Exception):
    """Raised by a hook on the last block's output: the rest of the forward is ours to do."""

    def __init__(self, resid: torch.Tensor) -> None:
        self.resid = resid


def forward_at(model, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> torch.Tensor:
    """Logits [batch, len(positions), vocab] at ``positions`` only (all positions if None).

    The sweep stores logits only where the task reads them, and unembedding every position is
    most of a forward with a large vocabulary (~58% of Pythia-70m's FLOPs at 128 tokens): the
    forward stops after the last block and ``ln_final`` + ``unembed`` run at ``positions``.
    """
    if positions is None or not hasattr(model, "unembed"):
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks)) if fwd_hooks else model(tokens)
        return logits if positions is None else logits[:, positions]

    def stop(resid: torch.Tensor, hook) -> None:
        raise _LastBlockDone(resid)

    try:
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", stop)])
    except _LastBlockDone as done:
        resid = done.resid[:, positions]
    else:  # pragma: no cover - a bridge whose last block has no hook_resid_post
        raise CircuitsError("cannot stop the forward after the last block (no hook_resid_post)")
    ln_final = getattr(model, "ln_final", None)
    return model.unembed(ln_final(resid) if ln_final is not None else resid)


def cache_batch(model, tokens: torch.Tensor, hooks: list[str], dtype: torch.dtype,
                positions: torch.Tensor | None = None):
    """One clean batch, caching patterns and ``hooks``: (logits, cache, arrays to store).

    ``arrays`` holds the attention patterns of every layer stacked as [batch, layer, head,
    q*(q+1)/2] (their causal lower triangle, as stored: ``store.PATTERN_LAYOUT``) and each
    hook's activation, converted to ``dtype`` (call under ``torch.no_grad()``). ``cache``
    holds what the hooks saw, patterns square. ``logits`` are taken at ``positions`` only when
    given (see :func:`forward_at`).
    """
    n_layers = model.cfg.n_layers
    names = [pattern_hook(layer) for layer in range(n_layers)] + list(hooks)
    cache: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable:
        # Keyed by the name asked for: the bridge may report an alias as ``hook.name``.
        def keep(tensor: torch.Tensor, hook) -> None:
            cache[name] = tensor.detach()

        return keep

    logits = forward_at(model, tokens, positions, [(name, keeper(name)) for name in names])
    n = tokens.shape[-1]
    triangle = torch.tensor(store.lower_triangle(n), device=tokens.device)
    # Gather the triangle, then convert: the float16 copy moves a quarter of the float32 square.
    patterns = torch.stack([cache[pattern_hook(layer)].flatten(-2).index_select(-1, triangle).to(dtype=dtype)
                            for layer in range(n_layers)], dim=1)
    arrays = {store.PATTERNS: _numpy(patterns, dtype)}
    arrays |= {f"activations/{hook}": _numpy(cache[hook], dtype) for hook in hooks}
    return logits, cache, arrays


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(dtype=dtype).cpu().numpy()


def _outputs(logits_clean: torch.Tensor, logits_corrupt: torch.Tensor, task: Task) -> dict[str, np.ndarray]:
    """Answer logits, metric and answer loss per example, float32, for both runs."""
    out = {}
    correct = task.correct.to(logits_clean.device)
    for label, logits in (("clean", logits_clean), ("corrupted", logits_corrupt)):
        at = answer_logits(logits, task).float()
        loss = -at.log_softmax(-1).gather(-1, correct[..., None])[..., 0].mean(-1)
        metric = metric_per_example(logits.float(), task, clean_logits=logits_clean.float())
        out[f"logits_{label}"] = at.cpu().numpy()
        out[f"metric_{label}"] = metric.cpu().numpy().astype(np.float32)
        out[f"loss_{label}"] = loss.cpu().numpy().astype(np.float32)
    return out


def _analysis_arrays(name: str, result: Any) -> dict[str, np.ndarray]:
    if not isinstance(result, dict):
        raise CircuitsError(f"analysis {name!r} returned {type(result).__name__}, expected a dict of arrays")
    arrays = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise CircuitsError(f"analysis {name!r}: key {key!r} is {array.dtype}, expected numbers or booleans")
        arrays[f"{name}/{str(key).strip('/')}"] = array
    return arrays


# ---------------------------------------------------------------- the sweep


def builtin_analyses(method: str = "none") -> list[tuple[str, Analysis]]:
    """Head detectors and progress measures at every step; the circuit when a method is chosen."""
    from circuits.detectors import head_analysis
    from circuits.progress import progress_analysis

    chosen: list[tuple[str, Analysis]] = [("heads", head_analysis), ("progress", progress_analysis)]
    if method != "none":
        from circuits.discovery.analysis import circuit_analysis

        chosen.append(("circuit", circuit_analysis))
    return chosen


def sweep(
    manifest: Manifest | str | Path,
    task: str | Task,
    out: str | Path,
    *,
    steps: str | None = None,
    hooks: str | Sequence[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    device: str = "cpu",
    n_examples: int | None = None,
    seed: int = 0,
    method: str = "none",
    analyses: Sequence[tuple[str, Analysis]] | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    executor: str | Any = "local",
    workers: int | None = None,
    ray_address: str | None = None,
) -> store.Study:
    """Cache patterns, activations, outputs and analyses of every selected step into ``out``.

    Resumable: complete shards are skipped; a study made with another manifest, task, prompts,
    hooks or dtype is refused. Returns the opened Study. ``analyses=None`` runs the built-in
    ones (``builtin_analyses(method)``); pass ``()`` for none.

    Each pending step runs on ``executor``: ``"local"`` (this process, one step at a time) or
    ``"ray"`` (one Ray task per step, ``workers`` at a time, on a local Ray instance or the
    cluster at ``ray_address``; see docs/scaling.md), or an executor object from
    ``circuits.executors``. Shards are the unit, so a sweep resumes whatever executor began it.
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    selected = select_steps(steps, manifest.steps)
    if dtype not in DTYPES:
        raise CircuitsError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise CircuitsError(f"--batch-size {batch_size}: must be at least 1")
    if method not in METHODS:
        raise CircuitsError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    check_executor(executor, workers, ray_address)  # before anything touches disk
    analyses = builtin_analyses(method) if analyses is None else analyses
    for name, _ in analyses:
        if name in store.RESERVED or "/" in name or not name:
            raise CircuitsError(f"analysis name {name!r} is reserved or invalid (not {', '.join(store.RESERVED)}, no '/')")
    task_name = task if isinstance(task, str) else task.name
    options = {"method": method, **(options or {})}

    out = Path(out)
    _check_writable(out)
    store.clean_stale_temporaries(out)
    existing = store.read_study_json(out)
    if existing is not None:
        _refuse_mismatch(out, existing, "manifest", manifest.to_yaml(), existing["manifest"], "use the same manifest")
        _refuse_mismatch(out, existing, "task", task_name, existing["task"]["name"], f"use --task {existing['task']['name']}")
        _refuse_mismatch(out, existing, "dtype", dtype, existing["dtype"], f"use --dtype {existing['dtype']}")
    done, layouts, tokens, damaged = _landed_shards(out, selected)
    pending = [s for s in selected if s not in done]

    runner = None
    if pending:  # started before any model is loaded: a wrong --workers or an unreachable cluster fails fast
        runner = make_executor(executor, workers, ray_address, device) if isinstance(executor, str) else executor
    try:
        return _run(manifest, task, out, selected, pending, done, layouts, tokens, damaged, existing, runner,
                    hooks=hooks, dtype=dtype, batch_size=batch_size, device=device, n_examples=n_examples,
                    seed=seed, analyses=analyses, options=options, progress=progress)
    finally:
        if runner is not None and isinstance(executor, str):
            runner.close()


def _run(manifest, task, out, selected, pending, done, layouts, tokens, damaged, existing, runner, *, hooks, dtype,
         batch_size, device, n_examples, seed, analyses, options, progress) -> store.Study:
    """The sweep once its arguments are checked: the task, study.json, then the steps on ``runner``."""
    from tqdm.auto import tqdm

    from circuits.loading import load

    # The task (and the hooks) come from a loaded model: that of the first step to visit. Only
    # the local executor reuses it; for Ray it is loaded on the CPU, leaving GPUs to the workers.
    probe = pending[0] if pending else selected[0]
    reuse = isinstance(runner, LocalExecutor)
    model = load(manifest, probe, device if reuse else "cpu")
    if isinstance(task, str):
        task = make_task(task, model, n_examples, seed)
    else:
        task.check_fits(model.cfg.d_vocab, model.cfg.n_ctx)
    if getattr(model.cfg, "attention_dir", "causal") != "causal":  # patterns are stored as lower triangles
        raise CircuitsError(f"{manifest.name}: attention is {model.cfg.attention_dir}, the sweep caches causal "
                            "language models only")
    hook_names = resolve_hooks(model, hooks)
    record = _study_record(manifest, task, model, hooks, hook_names, dtype, options)
    if existing is None:
        store.write_study_json(out, record)
    else:
        _refuse_mismatch(out, existing, "prompts (hash)", record["task"]["prompt_hash"], existing["task"]["prompt_hash"],
                         "use the same --n-examples and task seed")
        _refuse_mismatch(out, existing, "hooks", hook_names, existing["hooks"], "use the same --hooks")
        record = existing
    if not reuse:
        model = None
    _move_aside(damaged)
    index_provenance = {k: v for k, v in record.items() if k != "task"}
    if not (out / store.INDEX_FILE).exists() or not pending:
        store.write_index(out, layouts, tokens, index_provenance)

    spec = StepSpec(manifest=manifest, task=task, out=out, hooks=hook_names, dtype=dtype, batch_size=batch_size,
                    device=device, analyses=tuple(analyses), options=options, record=_step_record(record),
                    fault=os.environ.get(FAULT_ENV))
    bar = tqdm(total=len(selected), initial=len(selected) - len(pending), unit="step", desc="sweep",
               disable=not progress, dynamic_ncols=True)

    index = {"stale": False, "at": 0.0, "took": 0.0}

    def rebuild_index() -> None:
        started = time.perf_counter()
        store.write_index(out, layouts, tokens, index_provenance)
        index.update(stale=False, at=time.perf_counter(), took=time.perf_counter() - started)

    def landed(result: StepResult) -> None:
        """A shard landed (on the writer thread locally, in this thread for Ray): rebuild the index.

        Its cost grows with the steps landed, so it is rebuilt at most once per INDEX_THROTTLE
        times its last duration (<= ~10% of the time on tiny models), and always at the end.
        """
        layouts[result.step] = result.layout
        tokens[result.step] = result.tokens_seen
        index["stale"] = True
        if time.perf_counter() - index["at"] >= INDEX_THROTTLE * index["took"]:
            rebuild_index()
        bar.set_postfix(step=result.step, metric=f"{result.summary['metric_clean']:.3f}")
        bar.update(1)

    try:
        if pending:
            runner.run(spec, pending, landed, started=lambda step: bar.set_postfix(step=step), model=model)
    finally:
        bar.close()
        if index["stale"]:  # also after a failure: the index shows every shard that landed
            rebuild_index()
    return store.open_study(out)


def _study_record(manifest: Manifest, task: Task, model, hook_filter, hook_names: list[str], dtype: str,
                  options: dict[str, Any]) -> dict[str, Any]:
    cfg = model.cfg
    filter_text = hook_filter if isinstance(hook_filter, str) or hook_filter is None else ",".join(hook_filter)
    return {
        "format": store.STUDY_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "manifest": manifest.to_yaml(),
        "manifest_name": manifest.name,
        "manifest_origin": manifest.origin,
        "task": task_record(task),
        "model": {"n_layers": int(cfg.n_layers), "n_heads": int(cfg.n_heads), "d_model": int(cfg.d_model),
                  "d_head": int(cfg.d_head), "d_vocab": int(cfg.d_vocab), "n_ctx": int(cfg.n_ctx),
                  "architecture": manifest.architecture},
        "hook_filter": filter_text or DEFAULT_HOOKS,
        "hooks": hook_names,
        "dtype": dtype,
        "compression": store.COMPRESSION_NAME,
        "options": options,
        "versions": library_versions(),
    }


def _step_record(record: dict[str, Any]) -> dict[str, Any]:
    """The study record as each step needs it: without the task's arrays and prompts (sent once)."""
    return record | {"task": {k: v for k, v in record["task"].items() if k not in ("arrays", "prompts")}}


def _shard_provenance(record: dict[str, Any], manifest: Manifest, step: int, options: dict[str, Any],
                      batch_size: int, device: str) -> dict[str, Any]:
    """What made this shard; ``options`` are this sweep's (a resumed sweep may pass others)."""
    return {
        "format": store.SHARD_FORMAT,
        "step": int(step),
        "tokens_seen": int(manifest.tokens_seen(step)),
        "manifest": record["manifest"],
        "manifest_name": record["manifest_name"],
        "task": {k: v for k, v in record["task"].items() if k not in ("arrays", "prompts")},
        "hook_filter": record["hook_filter"],
        "hooks": record["hooks"],
        "dtype": record["dtype"],
        "options": options,
        "versions": library_versions(),
        "batch_size": batch_size,
        "device": device,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
