"""The per-step visit: everything that needs a loaded checkpoint happens in one visit.

Loading a checkpoint is the expensive part (for Pythia, a download per step), so a sweep
loads each step once and ``visit_step`` does all the work on it: clean and corrupted prompts
batch by batch (attention patterns, chosen activations, lean answer logits, loss, metric), then
every analysis. An analysis is a function

    analysis(ctx: VisitContext) -> dict[str, np.ndarray | float | int]

whose arrays have the same shape at every step; they land in the step's shard under
``/{analysis_name}/{key}`` and the index stacks them over steps (``study.array(...)``).
Built-in analyses: ``circuit`` (circuits.discovery), ``heads`` (circuits.detectors),
``progress`` (circuits.progress). This module and the loader are the only ones that name
TransformerLens hooks; it also says what made each shard (``shard_provenance``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits import store
from circuits.config import DEFAULT_HOOKS
from circuits.errors import CircuitsError
from circuits.manifest import Manifest
from circuits.tasks import (
    Task,
    answer_logits,
    at_answer_positions,
    lean_logits,
    loss_at_answers,
    metric_per_example,
)
from circuits.timing import phase

AnalysisResult = dict[str, "np.ndarray | float | int"]
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class VisitContext:
    """What an analysis gets: the model at one step, the task, and the run it came from.

    ``cache`` holds the clean run's attention patterns and cached activations when the visit
    already made them (a dict of tensors keyed by TL hook names), so analyses can reuse them.
    """

    model: Any  # transformer_lens TransformerBridge, eval mode
    task: Task
    manifest: Manifest
    step: int
    device: str = "cpu"
    cache: dict[str, Tensor] | None = None
    options: dict[str, Any] = field(default_factory=dict)


Analysis = Callable[[VisitContext], AnalysisResult]


@dataclass(frozen=True)
class VisitPlan:
    """What every step of a sweep does: the same task, hooks, dtype and analyses at each step."""

    manifest: Manifest
    task: Task
    hooks: list[str]  # resolved TL hook names (``resolve_hooks``)
    dtype: str = "float16"
    batch_size: int = 32
    device: str = "cpu"
    analyses: tuple[tuple[str, Analysis], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    keep_logits: bool = False  # also store full-vocabulary answer logits (outputs/logits_*)


@dataclass(frozen=True)
class StepSummary:
    """A visited step's mean metrics over the prompts (for the progress bar and the driver)."""

    metric_clean: float
    metric_corrupted: float
    loss_clean: float


# ---------------------------------------------------------------- hooks


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


def check_causal(model, manifest: Manifest) -> None:
    """Patterns are stored as causal lower triangles: refuse a model that attends both ways."""
    direction = getattr(model.cfg, "attention_dir", "causal")
    if direction != "causal":
        raise CircuitsError(f"{manifest.name}: attention is {direction}, the sweep caches causal language models only: "
                            "attention patterns are stored as causal lower triangles (circuits.discovery's discover, "
                            "score_edges and faithfulness do support bidirectional models)")


# ---------------------------------------------------------------- the visit


def visit_step(model, plan: VisitPlan, step: int, shard: store.ShardWriter) -> StepSummary:
    """Everything done with one loaded checkpoint; writes go to ``shard`` (not yet finished).

    Clean and corrupted prompts run batch by batch: the clean run caches attention patterns
    (all layers and heads) and ``plan.hooks``; both runs give the per-example loss and metric
    and the lean answer logits (all of them with ``plan.keep_logits``: :func:`outputs`). Then
    every analysis gets a VisitContext and its dict lands under ``/{name}/{key}``. For
    right-padded prompts the stored patterns and activations hold padding beyond each row's
    length, which the shard gives as ``task/lengths``.
    """
    task, batch_size, device = plan.task, plan.batch_size, plan.device
    shard.write_static({f"task/{k}": v for k, v in store.task_arrays(task).items()})
    sums = {"metric_clean": 0.0, "metric_corrupted": 0.0, "loss_clean": 0.0}
    whole_cache = None
    for start in range(0, task.n_examples, batch_size):
        sub = task.slice(start, min(start + batch_size, task.n_examples))
        positions, at_answers = at_answer_positions(sub)
        positions = positions.to(device)
        with torch.no_grad():
            logits_clean, cache, arrays = cache_batch(model, sub.clean.to(device), plan.hooks,
                                                      TORCH_DTYPES[plan.dtype], positions)
            with phase("forward"):
                logits_corrupt = forward_at(model, sub.corrupted.to(device), positions)
            with phase("extract"):
                answers = outputs(logits_clean, logits_corrupt, at_answers, TORCH_DTYPES[plan.dtype],
                                  keep_logits=plan.keep_logits)
        arrays |= {f"outputs/{k}": v for k, v in answers.items()}
        shard.write_batch(start, arrays)
        for key in sums:
            sums[key] += float(answers[key].sum())
        if start == 0 and task.n_examples <= batch_size:
            whole_cache = cache
        del cache, logits_clean, logits_corrupt
    ctx = VisitContext(model=model, task=task, manifest=plan.manifest, step=step, device=device,
                       cache=whole_cache, options=dict(plan.options))
    for name, analysis in plan.analyses:
        with phase(name):  # discovery marks its own phases (score, select, faithfulness) inside
            shard.write_static(analysis_arrays(name, analysis(ctx)))
    return StepSummary(**{k: v / task.n_examples for k, v in sums.items()})


class _LastBlockDone(Exception):
    """Raised by a hook on the last block's output: the rest of the forward is ours to do."""

    def __init__(self, resid: Tensor) -> None:
        self.resid = resid


def forward_at(model, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, " n_at"] | None = None,
               fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Float[Tensor, "batch n_at vocab"]:
    """Logits at ``positions`` only (all positions if None).

    The sweep stores logits only where the task reads them, and unembedding every position is
    most of a forward with a large vocabulary (~58% of Pythia-70m's FLOPs at 128 tokens): the
    forward stops after the last block and ``ln_final`` + ``unembed`` run at ``positions``.
    """
    if positions is None or not hasattr(model, "unembed"):
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks)) if fwd_hooks else model(tokens)
        return logits if positions is None else logits[:, positions]

    def stop(resid: Tensor, hook) -> None:
        raise _LastBlockDone(resid)

    try:
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", stop)])
    except _LastBlockDone as done:
        resid = done.resid[:, positions]
    else:  # pragma: no cover - a bridge whose last block has no hook_resid_post
        raise CircuitsError("cannot stop the forward after the last block (no hook_resid_post)")
    ln_final = getattr(model, "ln_final", None)
    return model.unembed(ln_final(resid) if ln_final is not None else resid)


def cache_batch(model, tokens: Int[Tensor, "batch pos"], hooks: list[str], dtype: torch.dtype,
                positions: Int[Tensor, " n_at"] | None = None
                ) -> tuple[Tensor, dict[str, Tensor], dict[str, np.ndarray]]:
    """One clean batch, caching patterns and ``hooks``: (logits, cache, arrays to store).

    ``arrays`` holds the attention patterns of every layer stacked as [batch, layer, head,
    q*(q+1)/2] (their causal lower triangle, as stored: ``store.PATTERN_LAYOUT``) and each
    hook's activation, converted to ``dtype`` (call under ``torch.no_grad()``). ``cache``
    holds what the hooks saw, patterns square. ``logits`` are taken at ``positions`` only when
    given (see :func:`forward_at`).
    """
    n_layers = model.cfg.n_layers
    names = [pattern_hook(layer) for layer in range(n_layers)] + list(hooks)
    cache: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable:
        # Keyed by the name asked for: the bridge may report an alias as ``hook.name``.
        def keep(tensor: Tensor, hook) -> None:
            cache[name] = tensor.detach()

        return keep

    with phase("forward"):
        logits = forward_at(model, tokens, positions, [(name, keeper(name)) for name in names])
    with phase("extract"):
        arrays = _stored_arrays(cache, hooks, n_layers, tokens, dtype)
    return logits, cache, arrays


def _stored_arrays(cache: dict[str, Tensor], hooks: list[str], n_layers: int, tokens: Tensor,
                   dtype: torch.dtype) -> dict[str, np.ndarray]:
    """The patterns' lower triangles and the hooks' activations in ``dtype``, as numpy."""
    n = tokens.shape[-1]
    triangle = torch.tensor(store.lower_triangle(n), device=tokens.device)
    # Gather the triangle, then convert: the float16 copy moves a quarter of the float32 square.
    patterns = torch.stack([cache[pattern_hook(layer)].flatten(-2).index_select(-1, triangle).to(dtype=dtype)
                            for layer in range(n_layers)], dim=1)
    arrays = {store.PATTERNS: _numpy(patterns, dtype)}
    arrays |= {f"activations/{hook}": _numpy(cache[hook], dtype) for hook in hooks}
    return arrays


def _numpy(tensor: Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(dtype=dtype).cpu().numpy()


def outputs(logits_clean: Float[Tensor, "batch n_at vocab"], logits_corrupt: Float[Tensor, "batch n_at vocab"],
            task: Task, dtype: torch.dtype = torch.float16, keep_logits: bool = False) -> dict[str, np.ndarray]:
    """Metric and answer loss per example (float32), and the lean answer logits (``dtype``),
    for both runs; with ``keep_logits`` also the full-vocabulary answer logits (``dtype``).

    Metric and loss come from the full logits here, whatever is stored: the kl metric and
    user metrics are as exact on a lean shard. The lean arrays (``tasks.lean_logits``) hold
    what the other built-in metrics read, so ``tasks.lean_metric`` recomputes them later.
    Both read the answer positions only, which are real tokens in every row: right padding
    never enters them (``Task.lengths``). The loss is minus the log-probability of the
    correct answer(s), averaged over each example's real answer slots.
    """
    out = {}
    for label, logits in (("clean", logits_clean), ("corrupted", logits_corrupt)):
        at = answer_logits(logits, task).float()
        loss = loss_at_answers(at, task)
        metric = metric_per_example(logits.float(), task, clean_logits=logits_clean.float())
        out[f"metric_{label}"] = metric.cpu().numpy().astype(np.float32)
        out[f"loss_{label}"] = loss.cpu().numpy().astype(np.float32)
        lean = lean_logits(at, task)  # from float32: one rounding to ``dtype``, at the end
        arrays = {"correct_logits": lean.correct, "wrong_logits": lean.wrong, "lse": lean.lse,
                  "mean_logit": lean.mean_logit}
        if keep_logits:
            arrays[store.FULL_LOGITS_KEY] = at
        out |= {f"{key}_{label}": _numpy(value, dtype) for key, value in arrays.items() if value is not None}
    return out


def analysis_arrays(name: str, result: Any) -> dict[str, np.ndarray]:
    """An analysis's dict as the shard's datasets (``{name}/{key}``); numbers and booleans only."""
    if not isinstance(result, dict):
        raise CircuitsError(f"analysis {name!r} returned {type(result).__name__}, expected a dict of arrays")
    arrays = {}
    for key, value in result.items():
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise CircuitsError(f"analysis {name!r}: key {key!r} is {array.dtype}, expected numbers or booleans")
        arrays[f"{name}/{str(key).strip('/')}"] = array
    return arrays


# ---------------------------------------------------------------- provenance


def library_versions() -> dict[str, str]:
    import h5py
    import hdf5plugin
    import transformer_lens

    import circuits

    return {"circuits": circuits.__version__, "torch": torch.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
            "h5py": h5py.__version__, "hdf5plugin": hdf5plugin.version, "numpy": np.__version__}


def task_record(task: Task) -> dict[str, Any]:
    """The task as study.json stores it: name, hash, metric (by name: a user function is
    recorded as its registered name), shape, padding, options, prompts and arrays."""
    return {
        "name": task.name, "prompt_hash": task.prompt_hash(), "metric": task.metric_name,
        "n_examples": task.n_examples, "seq_len": task.seq_len, "n_answers": int(task.answer_pos.shape[-1]),
        "padded": task.is_padded,
        "options": dict(task.options), "prompts": list(task.prompts),
        "arrays": {k: v.tolist() for k, v in store.task_arrays(task).items()},
    }


def step_record(record: dict[str, Any]) -> dict[str, Any]:
    """The study record as each step needs it: without the task's arrays and prompts (sent once)."""
    return record | {"task": {k: v for k, v in record["task"].items() if k not in ("arrays", "prompts")}}


# Options that follow from the steps a sweep selected, not from how a step is analysed (the
# steps checked against exact patching): a resumed sweep may select other steps, and whether a
# step was checked is in its own data (``circuit/trust``).
SELECTION_OPTIONS = ("trust_at",)


def shard_provenance(record: dict[str, Any], plan: VisitPlan, step: int) -> dict[str, Any]:
    """What made this shard; ``plan.options`` are this sweep's (a resumed sweep may pass others)."""
    return {
        "format": store.SHARD_FORMAT,
        "step": int(step),
        "tokens_seen": int(plan.manifest.tokens_seen(step)),
        "manifest": record["manifest"],
        "manifest_name": record["manifest_name"],
        "task": {k: v for k, v in record["task"].items() if k not in ("arrays", "prompts")},
        "graph": record["model"]["graph"],
        "hook_filter": record["hook_filter"],
        "hooks": record["hooks"],
        "dtype": record["dtype"],
        "keep_logits": plan.keep_logits,
        "options": {k: v for k, v in plan.options.items() if k not in SELECTION_OPTIONS},
        "versions": library_versions(),
        "batch_size": plan.batch_size,
        "device": plan.device,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
