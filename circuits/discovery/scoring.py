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
  (or in chunks of ``ig_chunk`` steps).
- ``patching``: the exact value: reader ``v`` gets ``a_u(corrupt)`` instead of
  ``a_u(clean)``, everything else stays clean and downstream effects propagate. Several
  edges are patched per forward (each on its own copy of the batch).

Scores of pairs that are not edges (``spec.valid`` False) are 0.
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from circuits.config import SCORING_METHODS as METHODS
from circuits.config import check_ig_steps, check_method
from circuits.discovery.functional import FunctionalModel
from circuits.errors import CircuitsError
from circuits.tasks import Task, at_answer_positions, check_model_fits, metric_per_example


def check_scoring(method: str, ig_steps: int) -> None:
    """A scoring method of this module, and for eap-ig a valid number of interpolation steps."""
    check_method(method, METHODS)
    if method == "eap-ig":
        check_ig_steps(ig_steps)


def check_task(model, task: Task) -> None:
    """Refuse prompts or answers the model cannot take, before any forward."""
    check_model_fits(model, task)


def _metric(logits, task: Task, clean_logits=None) -> torch.Tensor:
    return metric_per_example(logits, task, clean_logits)


@torch.no_grad()
def reference_runs(fm: FunctionalModel, task: Task):
    """Clean and corrupted runs of the full model: (clean Run, corrupted Run)."""
    clean = fm.run(task.clean.to(fm.device))
    corrupt = fm.run(task.corrupted.to(fm.device))
    return clean, corrupt


def _per_example_scores(delta: Float[Tensor, "n_forward batch pos d_model"],
                        grads: Float[Tensor, "n_backward batch pos d_model"],
                        fm: FunctionalModel) -> Float[np.ndarray, "batch n_forward n_backward"]:
    """Each example's attribution of each edge: (corrupted - clean writer output) . d metric / d port input."""
    products = einops.einsum(delta, grads, "f n p d, b n p d -> n f b")
    scores = products.float().cpu().numpy()
    scores[:, ~fm.spec.valid] = 0.0
    return scores


def score_eap(fm: FunctionalModel, task: Task) -> np.ndarray:
    """EAP: 2 forwards (one with gradients) and 1 backward for the whole batch; per example."""
    with torch.no_grad():
        corrupt = fm.run(task.corrupted.to(fm.device))
    positions, local = at_answer_positions(task)
    clean = fm.run(task.clean.to(fm.device), grad_ports=True, logit_positions=positions.to(fm.device))
    clean_logits = clean.logits.detach()
    value = _metric(clean.logits, local, clean_logits).sum()
    grads = fm.port_grads(clean, value)
    return _per_example_scores(corrupt.writers - clean.writers.detach(), grads, fm)


def score_eap_ig(fm: FunctionalModel, task: Task, steps: int = 5, ig_chunk: int | None = None) -> np.ndarray:
    """EAP-IG with ``steps`` interpolation points between corrupted (0) and clean (1) inputs; per example."""
    check_ig_steps(steps)
    clean_run, corrupt_run = reference_runs(fm, task)
    clean_in, corrupt_in = clean_run.writers[0], corrupt_run.writers[0]
    tokens = task.clean.to(fm.device)
    n = task.n_examples
    ig_chunk = ig_chunk or _default_chunk(fm, task, steps)
    positions, local = at_answer_positions(task)
    positions = positions.to(fm.device)
    clean_at = clean_run.logits[:, positions]
    grad_sum: torch.Tensor | None = None
    for start in range(1, steps + 1, ig_chunk):
        ks = torch.arange(start, min(start + ig_chunk, steps + 1), device=fm.device, dtype=fm.dtype)
        alphas = (ks / steps)[:, None, None, None]
        embeds = corrupt_in[None] + alphas * (clean_in - corrupt_in)[None]
        embeds = embeds.reshape(-1, *clean_in.shape[1:])
        run = fm.run(tokens.repeat(len(ks), 1), input_embeds=embeds, grad_ports=True, logit_positions=positions,
                     keep_writers=False)
        value = _metric(run.logits, local.repeat(len(ks)), clean_at.repeat(len(ks), 1, 1)).sum()
        grads = fm.port_grads(run, value).view(fm.spec.n_backward, len(ks), n, *clean_in.shape[1:]).sum(1)
        grad_sum = grads if grad_sum is None else grad_sum + grads
    if grad_sum is None:  # unreachable: check_ig_steps made steps >= 1, so the loop ran
        raise CircuitsError(f"eap-ig ran no interpolation step (steps={steps})")
    return _per_example_scores(corrupt_run.writers - clean_run.writers, grad_sum / steps, fm)


def _default_chunk(fm: FunctionalModel, task: Task, copies: int, budget: float | None = None) -> int:
    """How many copies of the batch to stack per forward, keeping activations near ``budget`` floats.

    On CPU small stacks run faster (cache), on an accelerator large ones do.
    """
    if budget is None:
        budget = 2e7 if fm.device.type == "cpu" else 2.5e8
    per_copy = task.n_examples * task.seq_len * (fm.spec.n_forward + 4 * fm.spec.n_backward) * fm.W_E.shape[-1]
    return int(max(1, min(copies, budget // max(per_copy, 1))))


@torch.no_grad()
def score_patching(fm: FunctionalModel, task: Task, edges_per_forward: int | None = None) -> np.ndarray:
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

    chunk = edges_per_forward or _default_chunk(fm, task, len(pairs), budget=5e7)
    scores = np.zeros((task.n_examples, *spec.shape), dtype=np.float32)
    scores[:, pairs[:, 0], pairs[:, 1]] = _corruption_effects(fm, task, len(pairs), one_edge_each, chunk).T
    return scores


def _corruption_effects(fm: FunctionalModel, task: Task, n: int, masks: Callable[[int, int], torch.Tensor],
                        chunk: int) -> np.ndarray:
    """float32 [n, n_examples]: each example's metric with ``masks(start, stop)`` corrupted, minus
    its clean metric."""
    clean_run, corrupt_run = reference_runs(fm, task)
    base = _metric(clean_run.logits, task, clean_run.logits)
    ablator = Ablator(fm, task, corrupt_run.writers, clean_run.logits)
    effects = [ablator.per_example(masks(start, min(start + chunk, n))) - base for start in range(0, n, chunk)]
    return torch.cat(effects).float().cpu().numpy()


class Ablator:
    """Runs of ``task`` in which the edges of a mask read ``reference`` instead of the clean
    writer outputs: the mean task metric of each of several masks, all in one forward."""

    def __init__(self, fm: FunctionalModel, task: Task, reference: torch.Tensor, clean_logits: torch.Tensor) -> None:
        self.fm, self.task, self.reference = fm, task, reference
        self.tokens = task.clean.to(fm.device)
        positions, self.answers = at_answer_positions(task)
        self.positions = positions.to(fm.device)
        self.clean_at = clean_logits[:, self.positions]

    @torch.no_grad()
    def per_example(self, masks: torch.Tensor) -> torch.Tensor:
        """[k, n_forward, n_backward] masks (1 = ablated) -> [k, n_examples] metrics."""
        run = self.fm.run(self.tokens, ablate=masks, reference=self.reference, logit_positions=self.positions)
        return self._per_copy(run.logits, masks.shape[0])

    @torch.no_grad()
    def per_example_replaced(self, rows: torch.Tensor) -> torch.Tensor:
        """[k, n_forward] writer masks (1 = that writer's output read from ``reference`` by every
        reader) -> [k, n_examples] metrics."""
        run = self.fm.run(self.tokens, replace=rows, reference=self.reference, logit_positions=self.positions)
        return self._per_copy(run.logits, rows.shape[0])

    def _per_copy(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """[k * n_examples, answers, vocab] logits of k stacked copies -> [k, n_examples] metrics."""
        values = _metric(logits, self.answers.repeat(k), self.clean_at.repeat(k, 1, 1))
        return values.view(k, self.task.n_examples)

    def metrics(self, masks: torch.Tensor) -> torch.Tensor:
        """[k, n_forward, n_backward] masks (1 = ablated) -> [k] mean metrics."""
        return self.per_example(masks).mean(1)


def score_edges(model_or_fm, task: Task, method: str = "eap-ig", ig_steps: int = 5) -> np.ndarray:
    """float32 [n_forward, n_backward] edge scores by ``method`` (eap, eap-ig, patching): the mean
    over examples of :func:`score_edges_per_example`."""
    return score_edges_per_example(model_or_fm, task, method, ig_steps).mean(0, dtype=np.float64).astype(np.float32)


def score_edges_per_example(model_or_fm, task: Task, method: str = "eap-ig", ig_steps: int = 5
                            ) -> Float[np.ndarray, "n_examples n_forward n_backward"]:
    """float32 edge scores of each example by ``method``; their mean is the edge's score."""
    fm = model_or_fm if isinstance(model_or_fm, FunctionalModel) else FunctionalModel(model_or_fm)
    check_scoring(method, ig_steps)
    if method == "eap":
        return score_eap(fm, task)
    if method == "eap-ig":
        return score_eap_ig(fm, task, ig_steps)
    return score_patching(fm, task)
