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

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.discovery.functional import FunctionalModel
from circuits.discovery.scoring import Ablator, References, mean_over_real, real_row_sum
from circuits.errors import CircuitsError
from circuits.tasks import Task
from circuits.timing import phase

ABLATIONS = ("corrupt", "mean")
GAP_TOL = 1e-4
GAP_Z = 2.0


@dataclass
class Evaluator:
    """Everything needed to score many candidate circuits of one model on one task.

    ``refs``: the task's reference runs when the caller has them (discover shares the ones
    scoring used). Each distinct circuit is measured once: a repeated mask reads its stored
    metric, the full circuit reads the clean metric and the empty one the baseline.
    """

    fm: FunctionalModel
    task: Task
    ablation: str = "corrupt"
    gap_tol: float = GAP_TOL
    gap_z: float = GAP_Z
    refs: References | None = None

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise CircuitsError(f"unknown ablation {self.ablation!r}; expected one of: {', '.join(ABLATIONS)}")
        mean = self.ablation == "mean"
        if self.refs is None or (mean and self.refs.clean_mean is None):
            self.refs = References.of(self.fm, self.task, mean=mean)
        refs = self.refs
        clean_each, corrupt_each = refs.clean_each.double(), refs.corrupted_each.double()
        self.metric_clean = float(clean_each.mean())
        self.metric_corrupted = float(corrupt_each.mean())
        if refs.clean_mean is not None and mean:
            self.reference = refs.clean_mean
            self.ablator = Ablator(self.fm, self.task, self.reference, refs)
            full = torch.ones(1, *self.fm.spec.shape, device=self.fm.device)
            baseline_each = self.ablator.per_example(full)[0]
        else:
            self.reference = refs.corrupt_writers
            self.ablator = Ablator(self.fm, self.task, self.reference, refs)
            baseline_each = corrupt_each
        self.clean_each = clean_each
        self.baseline = float(baseline_each.mean())
        self.gap = self.metric_clean - self.baseline
        diff = clean_each - baseline_each
        self.gap_se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
        self.gap_nil = bool(abs(self.gap) < max(self.gap_tol, self.gap_z * self.gap_se))
        self._measured: dict[bytes, float] = {}

    def metrics(self, circuits: np.ndarray) -> np.ndarray:
        """The mean metric with everything outside each circuit ablated ([k, n_forward, n_backward] masks)."""
        valid = self.fm.spec.valid
        keys = [np.packbits(c & valid).tobytes() for c in circuits]
        known = {key: self.metric_clean for key, c in zip(keys, circuits, strict=True) if (c | ~valid).all()}
        known |= {key: self.baseline for key, c in zip(keys, circuits, strict=True) if not (c & valid).any()}
        known |= {key: self._measured[key] for key in keys if key in self._measured}
        todo = list(dict.fromkeys(key for key in keys if key not in known))
        if todo:
            first = {key: i for i, key in reversed(list(enumerate(keys)))}
            masks = np.stack([~circuits[first[key]] for key in todo])
            with phase("faithfulness"):
                values = self.ablator.metrics(torch.as_tensor(masks, device=self.fm.device, dtype=self.fm.dtype))
            self._measured |= dict(zip(todo, values.cpu().numpy().tolist(), strict=True))
            known |= {key: self._measured[key] for key in todo}
        return np.array([known[key] for key in keys], dtype=np.float64)

    def faithfulness(self, circuits: np.ndarray) -> np.ndarray:
        """Faithfulness of each circuit mask ([n_forward, n_backward] or [k, ...]); NaN if the gap is nil."""
        circuits = np.asarray(circuits, dtype=bool)
        single = circuits.ndim == 2
        circuits = circuits[None] if single else circuits
        metrics = self.metrics(circuits)
        faith = np.full(len(metrics), np.nan) if self.gap_nil else (metrics - self.baseline) / self.gap
        return faith[0] if single else faith

    def node_effects(self) -> Float[np.ndarray, "n_examples n_forward"]:
        """Each example's metric change when one writer's output is ablated for every reader at
        once (``input``: the whole embedding), by this evaluator's ablation; ``n_forward`` copies
        of the batch, as many per forward as the memory budget allows."""
        n = self.fm.spec.n_forward
        eye = torch.eye(n, device=self.fm.device, dtype=self.fm.dtype)
        with phase("faithfulness"):
            effects = self.ablator.per_example_of(n, lambda a, b: eye[a:b], replace=True) - self.clean_each[None]
        return effects.T.float().cpu().numpy()


def real_row_mean(writers: Float[Tensor, "n_forward batch pos d_model"],
                  real: Bool[Tensor, "batch pos"]) -> Float[Tensor, "n_forward batch pos d_model"]:
    """Each writer's output averaged over the rows that have a real token at each position
    (right padding is not an input the model ever sees), the same for every row: what mean
    ablation reads (``References.of`` sums it chunk by chunk)."""
    return mean_over_real(real_row_sum(writers, real), real)


def faithfulness(model, task: Task, in_circuit: np.ndarray, ablation: str = "corrupt", gap_tol: float = GAP_TOL,
                 gap_z: float = GAP_Z) -> float:
    """Recovered share of the clean-baseline metric gap by the circuit ``in_circuit`` (NaN if nil gap)."""
    fm = model if isinstance(model, FunctionalModel) else FunctionalModel(model)
    return float(Evaluator(fm, task, ablation, gap_tol, gap_z).faithfulness(in_circuit))
