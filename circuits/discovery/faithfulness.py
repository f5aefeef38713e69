"""Faithfulness by intervention: run the model with every edge outside the circuit ablated.

``faithfulness = (M_circuit - M_baseline) / (M_clean - M_baseline)``, all metrics averaged
over the task's examples. Ablation ``"corrupt"`` gives each ablated reader the corrupted
run's writer output; the baseline is then the corrupted run (every edge ablated).
Ablation ``"mean"`` gives it the clean writer output averaged over the batch (per position,
over the rows that are real there: right padding never enters the mean); the baseline is
then the model with every edge mean-ablated.
The gap is *nil* when ``|M_clean - M_baseline|`` is below ``gap_tol`` or below ``gap_z``
standard errors of the per-example gap (clean and baseline indistinguishable on this batch):
faithfulness is then NaN and ``gap_nil`` is set, never a ratio of two noise terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.discovery.functional import FunctionalModel
from circuits.discovery.scoring import Ablator, _default_chunk, reference_runs
from circuits.errors import CircuitsError
from circuits.tasks import Task, metric_per_example

ABLATIONS = ("corrupt", "mean")
GAP_TOL = 1e-4
GAP_Z = 2.0


@dataclass
class Evaluator:
    """Everything needed to score many candidate circuits of one model on one task."""

    fm: FunctionalModel
    task: Task
    ablation: str = "corrupt"
    gap_tol: float = GAP_TOL
    gap_z: float = GAP_Z

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise CircuitsError(f"unknown ablation {self.ablation!r}; expected one of: {', '.join(ABLATIONS)}")
        clean, corrupt = reference_runs(self.fm, self.task)
        self.tokens = self.task.clean.to(self.fm.device)
        clean_each = metric_per_example(clean.logits, self.task, clean.logits).double()
        corrupt_each = metric_per_example(corrupt.logits, self.task, clean.logits).double()
        self.metric_clean = float(clean_each.mean())
        self.metric_corrupted = float(corrupt_each.mean())
        if self.ablation == "corrupt":
            self.reference = corrupt.writers
            baseline_each = corrupt_each
        else:
            self.reference = real_row_mean(clean.writers, self.task.real_positions().to(self.fm.device))
            full = torch.ones(1, *self.fm.spec.shape, device=self.fm.device)
            run = self.fm.run(self.tokens, ablate=full, reference=self.reference)
            baseline_each = metric_per_example(run.logits, self.task, clean.logits).double()
        self.ablator = Ablator(self.fm, self.task, self.reference, clean.logits)
        self.clean_each = clean_each
        self.baseline = float(baseline_each.mean())
        self.gap = self.metric_clean - self.baseline
        diff = clean_each - baseline_each
        self.gap_se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
        self.gap_nil = bool(abs(self.gap) < max(self.gap_tol, self.gap_z * self.gap_se))

    def faithfulness(self, circuits: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Faithfulness of each circuit mask ([n_forward, n_backward] or [k, ...]); NaN if the gap is nil.

        ``chunk`` circuits are evaluated per forward (default: as many as fit a modest memory budget).
        """
        circuits = np.asarray(circuits, dtype=bool)
        single = circuits.ndim == 2
        circuits = circuits[None] if single else circuits
        chunk = chunk or _default_chunk(self.fm, self.task, len(circuits), budget=5e7)
        out = []
        for start in range(0, len(circuits), chunk):
            block = torch.as_tensor(~circuits[start : start + chunk], device=self.fm.device, dtype=self.fm.dtype)
            out.append(self.ablator.metrics(block).double().cpu().numpy())
        metrics = np.concatenate(out)
        faith = np.full(len(metrics), np.nan) if self.gap_nil else (metrics - self.baseline) / self.gap
        return faith[0] if single else faith

    def node_effects(self, chunk: int | None = None) -> Float[np.ndarray, "n_examples n_forward"]:
        """Each example's metric change when one writer's output is ablated for every reader at
        once (``input``: the whole embedding), by this evaluator's ablation; ``n_forward`` copies
        of the batch, ``chunk`` per forward."""
        n = self.fm.spec.n_forward
        # a copy holds one residual and the writers' outputs, not a residual per port
        per_copy = self.task.n_examples * self.task.seq_len * (n + 8) * self.fm.W_E.shape[-1]
        chunk = chunk or int(max(1, min(n, 5e7 // per_copy)))
        out = []
        for start in range(0, n, chunk):
            rows = torch.eye(n, device=self.fm.device, dtype=self.fm.dtype)[start : start + chunk]
            out.append(self.ablator.per_example_replaced(rows).double() - self.clean_each[None])
        return torch.cat(out).T.float().cpu().numpy()


def real_row_mean(writers: Float[Tensor, "n_forward batch pos d_model"],
                  real: Bool[Tensor, "batch pos"]) -> Float[Tensor, "n_forward batch pos d_model"]:
    """Each writer's output averaged over the rows that have a real token at each position
    (right padding is not an input the model ever sees), the same for every row."""
    if bool(real.all()):  # unpadded: the plain batch mean, as it always was
        return writers.mean(1, keepdim=True).expand_as(writers).contiguous()
    weights = real.to(writers.dtype)
    total = einops.einsum(writers, weights, "w b p d, b p -> w p d")
    count = weights.sum(0).clamp(min=1.0)  # a position no row reaches keeps a zero mean
    mean = total / count[None, :, None]
    return einops.repeat(mean, "w p d -> w b p d", b=writers.shape[1]).contiguous()


def faithfulness(model, task: Task, in_circuit: np.ndarray, ablation: str = "corrupt", gap_tol: float = GAP_TOL,
                 gap_z: float = GAP_Z) -> float:
    """Recovered share of the clean-baseline metric gap by the circuit ``in_circuit`` (NaN if nil gap)."""
    fm = model if isinstance(model, FunctionalModel) else FunctionalModel(model)
    return float(Evaluator(fm, task, ablation, gap_tol, gap_z).faithfulness(in_circuit))
