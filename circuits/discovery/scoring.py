"""Edge scores: EAP, EAP-IG and exact activation patching, batched over examples.

Convention (as EAP-IG, Hanna et al. 2024): a score estimates what the task metric does when
the edge is *corrupted* in an otherwise clean run, ``M(clean, edge from corrupt) - M(clean)``,
averaged over examples and summed over positions. An edge the task needs has a negative
score (corrupting it lowers the metric); rank edges by ``|score|``.

- ``eap``: ``(a_u(corrupt) - a_u(clean)) . dM/d(input of v)`` at the clean run.
  TL 4.3's ``attribution_patch`` uses the denoising form (gradient on the corrupted run,
  ``a(clean) - a(corrupt)``): it equals our ``eap`` on the task with clean and corrupted
  swapped, summed over positions (tests check this to 1e-4).
- ``eap-ig``: the same delta times the gradient averaged over ``m`` points of the straight
  line from the corrupted to the clean input embeddings (``k/m``, ``k = 1..m``), as in
  Hanna et al.'s EAP-IG ("inputs" variant). All ``m`` steps run as one stacked batch
  (in chunks of steps and of examples that fit the memory budget, ``budget.py``).
- ``patching``: the exact value: reader ``v`` gets ``a_u(corrupt)`` instead of
  ``a_u(clean)``, everything else stays clean and downstream effects propagate. Several
  edges are patched per forward (each on its own copy of the batch).

Scores of pairs that are not edges (``spec.valid`` False) are 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import einops
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.config import SCORING_METHODS as METHODS
from circuits.config import check_ig_steps, check_method
from circuits.discovery.functional import FunctionalModel
from circuits.errors import CircuitsError
from circuits.tasks import (
    METRIC_NAMES,
    Task,
    at_answer_positions,
    check_model_fits,
    metric_per_example,
)
from circuits.timing import phase

# Built-in metrics that read only this run's logits (kl and user metrics also read the clean run's).
LOGIT_METRICS = tuple(name for name in METRIC_NAMES if name != "kl")


def check_scoring(method: str, ig_steps: int) -> None:
    """A scoring method of this module, and for eap-ig a valid number of interpolation steps."""
    check_method(method, METHODS)
    if method == "eap-ig":
        check_ig_steps(ig_steps)


def check_task(model, task: Task) -> None:
    """Refuse prompts or answers the model cannot take, before any forward."""
    check_model_fits(model, task)


@torch.no_grad()
def reference_runs(fm: FunctionalModel, task: Task):
    """Clean and corrupted runs of the full model: (clean Run, corrupted Run)."""
    clean = fm.run(task.clean.to(fm.device))
    corrupt = fm.run(task.corrupted.to(fm.device))
    return clean, corrupt


@dataclass
class References:
    """The full model's clean and corrupted runs of a task: computed once per step (in chunks
    of examples) and shared by scoring, faithfulness, node effects and the trust check.

    ``positions`` are the positions the metric reads and ``answers`` the task re-indexed to
    them (``at_answer_positions``). ``clean_each`` / ``corrupted_each`` are each example's
    metric; ``clean_at`` the clean logits there, kept only for a metric that reads them (kl, a
    user metric). ``corrupt_writers`` are the corrupted run's writer outputs (the reference of
    corrupt ablation and of EAP's deltas); ``clean_mean`` the clean outputs averaged over the
    rows real at each position (mean ablation), when asked for.
    """

    positions: Int[Tensor, " n_at"]
    answers: Task
    clean_each: Float[Tensor, " batch"]
    corrupted_each: Float[Tensor, " batch"]
    corrupt_writers: Float[Tensor, "n_forward batch pos d_model"]
    clean_at: Float[Tensor, "batch n_at vocab"] | None = None
    clean_mean: Float[Tensor, "n_forward batch pos d_model"] | None = None

    @classmethod
    @torch.no_grad()
    def of(cls, fm: FunctionalModel, task: Task, mean: bool = False) -> References:
        """Both runs, ``fm.budget`` bounding each chunk; ``mean``: also the clean outputs' real-row mean."""
        positions, answers = at_answer_positions(task)
        positions = positions.to(fm.device)
        chunk = fm.budget.plan(fm.cost(task, "run"), task.n_examples).examples
        keep_logits = task.metric not in LOGIT_METRICS
        clean_at, clean_each, corrupted_each = [], [], []
        corrupt_writers: Tensor | None = None  # filled chunk by chunk: no list of chunks to concatenate
        totals: Tensor | None = None
        for start in range(0, task.n_examples, chunk):
            sub = answers.slice(start, min(start + chunk, task.n_examples))
            clean = fm.run(task.clean[start : start + sub.n_examples].to(fm.device), logit_positions=positions,
                           keep_writers=mean)
            corrupt = fm.run(task.corrupted[start : start + sub.n_examples].to(fm.device), logit_positions=positions)
            clean_each.append(metric_per_example(clean.logits, sub, clean.logits))
            corrupted_each.append(metric_per_example(corrupt.logits, sub, clean.logits))
            if keep_logits:
                clean_at.append(clean.logits)
            if corrupt_writers is None:
                corrupt_writers = corrupt.writers.new_empty((corrupt.writers.shape[0], task.n_examples,
                                                             *corrupt.writers.shape[2:]))
            corrupt_writers[:, start : start + sub.n_examples] = corrupt.writers
            if mean:
                part = real_row_sum(clean.writers, task.slice(start, start + sub.n_examples).real_positions())
                totals = part if totals is None else totals + part
            del clean, corrupt
        if corrupt_writers is None:  # unreachable: a task has at least one example
            raise CircuitsError(f"task {task.name} has no examples")
        clean_mean = None if totals is None else mean_over_real(totals, task.real_positions())
        return cls(positions, answers, torch.cat(clean_each), torch.cat(corrupted_each), corrupt_writers,
                   torch.cat(clean_at) if keep_logits else None, clean_mean)

    def metric(self, logits: Float[Tensor, "kb n_at vocab"], start: int = 0, copies: int = 1) -> Float[Tensor, " kb"]:
        """The metric of ``copies`` stacked copies of rows ``start:start + len(logits) / copies``
        from their logits at ``positions`` (the kl metric against the clean run's)."""
        stop = start + logits.shape[0] // copies
        clean_at = None if self.clean_at is None else self.clean_at[start:stop].repeat(copies, 1, 1)
        return metric_per_example(logits, self.answers.slice(start, stop).repeat(copies), clean_at)


def real_row_sum(writers: Float[Tensor, "n_forward batch pos d_model"],
                 real: Bool[Tensor, "batch pos"]) -> Float[Tensor, "n_forward pos d_model"]:
    """Each writer's outputs summed, per position, over the rows with a real token there."""
    return einops.einsum(writers, real.to(writers.device, writers.dtype), "w b p d, b p -> w p d")


def mean_over_real(total: Float[Tensor, "n_forward pos d_model"],
                   real: Bool[Tensor, "batch pos"]) -> Float[Tensor, "n_forward batch pos d_model"]:
    """:func:`real_row_sum` over all rows as a mean, the same for every row (a view, no copy);
    right padding is not an input the model ever sees, and a position no row reaches keeps 0."""
    count = real.to(total.device, total.dtype).sum(0).clamp(min=1.0)
    return (total / count[None, :, None])[:, None].expand(-1, real.shape[0], -1, -1)


def _per_example_scores(delta: Float[Tensor, "n_forward batch pos d_model"], grads: list[Tensor],
                        fm: FunctionalModel) -> Float[np.ndarray, "batch n_forward n_backward"]:
    """Each example's attribution of each edge: (corrupted - clean writer output) . d metric / d
    port input, by group of ports (:meth:`FunctionalModel.port_groups`) over the writers before
    them only: no stack of every port's gradient, no product outside the valid edges."""
    n_f, batch, n_pos, d = delta.shape
    by_example = delta.permute(1, 0, 2, 3).reshape(batch, n_f, n_pos * d)  # one copy, then views
    scores = torch.zeros(batch, n_f, fm.spec.n_backward, dtype=torch.float32, device=delta.device)
    for (first, stop, n_writers), grad in zip(fm.port_groups(), grads, strict=True):
        per_port = grad.permute(0, 1, 3, 2).reshape(batch, n_pos * d, stop - first)
        scores[:, :n_writers, first:stop] = torch.bmm(by_example[:, :n_writers], per_port).float()
    out = scores.cpu().numpy()
    out[:, ~fm.spec.valid] = 0.0
    return out


def _chunked_scores(fm: FunctionalModel, task: Task, kind: str, copies: int,
                    score: Callable[[Task, int, int], np.ndarray]) -> np.ndarray:
    """``score(sub_task, start, copies_per_forward)`` over chunks of examples that fit ``fm.budget``."""
    plan = fm.budget.plan(fm.cost(task, kind), task.n_examples, copies, per_example=fm.cost(task, "kept"))
    parts = [score(task.slice(start, min(start + plan.examples, task.n_examples)), start, plan.copies)
             for start in range(0, task.n_examples, plan.examples)]
    return np.concatenate(parts)


def score_eap(fm: FunctionalModel, task: Task, refs: References | None = None) -> np.ndarray:
    """EAP: per chunk of examples, one forward with gradients and one backward; per example."""
    refs = refs or References.of(fm, task)

    def chunk(sub: Task, start: int, _copies: int) -> np.ndarray:
        rows = slice(start, start + sub.n_examples)
        clean = fm.run(sub.clean.to(fm.device), grad_ports=True, logit_positions=refs.positions)
        value = refs.metric(clean.logits, start).sum()
        grads = fm.port_grads_by_group(clean, value)
        with torch.no_grad():
            return _per_example_scores(refs.corrupt_writers[:, rows] - clean.writers.detach(), grads, fm)

    return _chunked_scores(fm, task, "grad", 1, chunk)


def score_eap_ig(fm: FunctionalModel, task: Task, steps: int = 5, refs: References | None = None) -> np.ndarray:
    """EAP-IG with ``steps`` interpolation points between corrupted (0) and clean (1) inputs; per example.

    Per chunk of examples, the steps run stacked as far as ``fm.budget`` allows; the gradients
    are summed per group of ports, then multiplied by the deltas once.
    """
    check_ig_steps(steps)
    refs = refs or References.of(fm, task)

    def chunk(sub: Task, start: int, per_forward: int) -> np.ndarray:
        rows = slice(start, start + sub.n_examples)
        tokens = sub.clean.to(fm.device)
        clean_in, corrupt_in = fm.embed(tokens), refs.corrupt_writers[0, rows]
        sums: list[Tensor] | None = None
        clean_writers: Tensor | None = None
        for first in range(1, steps + 1, per_forward):
            ks = list(range(first, min(first + per_forward, steps + 1)))
            # step m is the clean input itself (not corrupt + 1.0 * (clean - corrupt), which may
            # round): its run gives the clean writer outputs of the deltas, with no extra forward
            embeds = torch.stack([clean_in if k == steps else corrupt_in + (k / steps) * (clean_in - corrupt_in)
                                  for k in ks]).reshape(-1, *clean_in.shape[1:])
            last = ks[-1] == steps
            run = fm.run(tokens.repeat(len(ks), 1), input_embeds=embeds, grad_ports=True,
                         logit_positions=refs.positions, keep_writers=last)
            value = refs.metric(run.logits, start, copies=len(ks)).sum()
            grads = [g.view(len(ks), sub.n_examples, *g.shape[1:]).sum(0) for g in fm.port_grads_by_group(run, value)]
            sums = grads if sums is None else [a + b for a, b in zip(sums, grads, strict=True)]
            if last:
                clean_writers = run.writers.detach()[:, -sub.n_examples :]
        if sums is None or clean_writers is None:  # unreachable: check_ig_steps made steps >= 1, so step m ran
            raise CircuitsError(f"eap-ig ran no interpolation step (steps={steps})")
        with torch.no_grad():
            return _per_example_scores(refs.corrupt_writers[:, rows] - clean_writers, [g / steps for g in sums], fm)

    return _chunked_scores(fm, task, "grad", steps, chunk)


@torch.no_grad()
def score_patching(fm: FunctionalModel, task: Task, refs: References | None = None) -> np.ndarray:
    """Exact, per example: for every edge, the metric change when its reader gets the corrupted
    writer output."""
    spec = fm.spec
    # By reader, so that a forward's copies ablate ports of one layer: the layers before it run
    # as unablated (see FunctionalModel.run).
    pairs = np.argwhere(spec.valid.T)[:, ::-1]

    def one_edge_each(start: int, stop: int) -> torch.Tensor:
        block = pairs[start:stop]
        masks = torch.zeros(len(block), *spec.shape, device=fm.device, dtype=fm.dtype)
        masks[torch.arange(len(block)), block[:, 0], block[:, 1]] = 1.0
        return masks

    refs = refs or References.of(fm, task)
    ablator = Ablator(fm, task, refs.corrupt_writers, refs)
    base = refs.clean_each
    scores = np.zeros((task.n_examples, *spec.shape), dtype=np.float32)
    effects = ablator.per_example_of(len(pairs), one_edge_each) - base[None]
    scores[:, pairs[:, 0], pairs[:, 1]] = effects.T.float().cpu().numpy()
    return scores


class Ablator:
    """Runs of ``task`` in which the edges of a mask read ``reference`` instead of the clean
    writer outputs: each example's metric under each of several masks, stacked as copies and
    chunked by examples to fit ``fm.budget``."""

    def __init__(self, fm: FunctionalModel, task: Task, reference: torch.Tensor, refs: References) -> None:
        self.fm, self.task, self.reference, self.refs = fm, task, reference, refs

    def copies_per_forward(self) -> int:
        """How many ablated copies of the whole batch one forward holds (1 when examples are chunked)."""
        return self.fm.budget.plan(self.fm.cost(self.task, "ablated"), self.task.n_examples, 2**31).copies

    @torch.no_grad()
    def per_example(self, masks: torch.Tensor) -> torch.Tensor:
        """[k, n_forward, n_backward] masks (1 = ablated) -> [k, n_examples] metrics."""
        return self.per_example_of(masks.shape[0], lambda a, b: masks[a:b])

    @torch.no_grad()
    def per_example_of(self, k: int, masks: Callable[[int, int], torch.Tensor], replace: bool = False) -> torch.Tensor:
        """[k, n_examples] metrics of the masks ``masks(a, b)`` gives for ``a:b`` (made chunk by
        chunk: k may be large); ``replace``: masks are [*, n_forward] writer masks (node effects)."""
        plan = self.fm.budget.plan(self.fm.cost(self.task, "replaced" if replace else "ablated"), self.task.n_examples, k)
        out = torch.empty(k, self.task.n_examples, dtype=torch.float64, device=self.fm.device)
        for first in range(0, k, plan.copies):
            block = masks(first, min(first + plan.copies, k))
            for start in range(0, self.task.n_examples, plan.examples):
                stop = min(start + plan.examples, self.task.n_examples)
                out[first : first + len(block), start:stop] = self._metrics(block, start, stop, replace)
        return out

    def _metrics(self, block: torch.Tensor, start: int, stop: int, replace: bool) -> torch.Tensor:
        tokens = self.task.clean[start:stop].to(self.fm.device)
        reference = self.reference[:, start:stop]
        run = self.fm.run(tokens, reference=reference, logit_positions=self.refs.positions, keep_writers=False,
                          ablate=None if replace else block, replace=block if replace else None)
        k, n = block.shape[0], stop - start
        return self.refs.metric(run.logits, start, copies=k).view(k, n).double()

    def per_example_replaced(self, rows: torch.Tensor) -> torch.Tensor:
        """[k, n_forward] writer masks (1 = that writer's output read from ``reference`` by every
        reader) -> [k, n_examples] metrics."""
        return self.per_example_of(rows.shape[0], lambda a, b: rows[a:b], replace=True)

    def metrics(self, masks: torch.Tensor) -> torch.Tensor:
        """[k, n_forward, n_backward] masks (1 = ablated) -> [k] mean metrics."""
        return self.per_example(masks).mean(1)


def score_edges(model_or_fm, task: Task, method: str = "eap-ig", ig_steps: int = 5) -> np.ndarray:
    """float32 [n_forward, n_backward] edge scores by ``method`` (eap, eap-ig, patching): the mean
    over examples of :func:`score_edges_per_example`."""
    return score_edges_per_example(model_or_fm, task, method, ig_steps).mean(0, dtype=np.float64).astype(np.float32)


def score_edges_per_example(model_or_fm, task: Task, method: str = "eap-ig", ig_steps: int = 5,
                            refs: References | None = None) -> Float[np.ndarray, "n_examples n_forward n_backward"]:
    """float32 edge scores of each example by ``method``; their mean is the edge's score.
    ``refs``: the task's reference runs, when the caller has them (discover shares them)."""
    fm = model_or_fm if isinstance(model_or_fm, FunctionalModel) else FunctionalModel(model_or_fm)
    check_scoring(method, ig_steps)
    with phase("score"):
        if method == "eap":
            return score_eap(fm, task, refs)
        if method == "eap-ig":
            return score_eap_ig(fm, task, ig_steps, refs)
        return score_patching(fm, task, refs)
