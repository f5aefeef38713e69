"""How sure a circuit is: resample the prompts, select again, see what stays.

Edge scores are means over examples (EAP, EAP-IG and patching alike), so the per-example
scores ``[n_examples, n_forward, n_backward]`` give any resample's scores for the price of a
mean: a bootstrap over examples needs no new forward. Each resample selects its circuit by
the same rule and size as the full-data circuit (top-n with the same n, or the same
threshold), and we keep:

- ``inclusion``: per edge, the share of resamples whose circuit holds it;
- ``score_se``: per edge, the bootstrap standard error of its score;
- ``resample_jaccard``: per resample, the Jaccard of its circuit against the full-data one
  (its mean is the circuit's reproducibility);
- ``stable``: the edges in at least ``stable_share`` of the resamples (the *stable circuit*),
  and its faithfulness, measured by ablating everything outside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float

from circuits.config import RESAMPLES, STABLE_SHARE, check_resamples, check_stable_share
from circuits.graph import jaccard


@dataclass
class CircuitUncertainty:
    """The bootstrap of one step's circuit (shapes: [n_forward, n_backward] unless noted)."""

    inclusion: Float[np.ndarray, "n_forward n_backward"]
    score_se: Float[np.ndarray, "n_forward n_backward"]
    resample_jaccard: Float[np.ndarray, " resamples"]
    stable: Bool[np.ndarray, "n_forward n_backward"]
    stable_faithfulness: float = float("nan")  # measured by discover(), by ablation like any circuit

    @property
    def reproducibility(self) -> float:
        return float(np.mean(self.resample_jaccard))


def resample_circuits(
    per_example: Float[np.ndarray, "n_examples n_forward n_backward"],
    circuit: Bool[np.ndarray, "n_forward n_backward"],
    select: Callable[[np.ndarray], np.ndarray],
    resamples: int = RESAMPLES,
    stable_share: float = STABLE_SHARE,
    seed: int = 0,
) -> CircuitUncertainty:
    """Bootstrap the examples ``resamples`` times; ``select(scores) -> mask`` is the full-data rule."""
    check_resamples(resamples)
    check_stable_share(stable_share)
    per_example = np.asarray(per_example, dtype=np.float64)
    n = per_example.shape[0]
    rng = np.random.default_rng(seed)
    counts = np.zeros(per_example.shape[1:], dtype=np.int64)
    means = np.empty((resamples, *per_example.shape[1:]))
    jaccards = np.empty(resamples)
    for r in range(resamples):
        scores = per_example[rng.integers(0, n, n)].mean(0)
        mask = np.asarray(select(scores), dtype=bool)
        counts += mask
        means[r] = scores
        jaccards[r] = jaccard(mask, circuit)
    inclusion = counts / resamples
    # Rounding guard: 16 of 20 resamples is exactly the default 80%.
    stable = inclusion >= stable_share - 1e-9
    return CircuitUncertainty(inclusion=inclusion.astype(np.float32), score_se=means.std(0, ddof=1).astype(np.float32)
                              if resamples > 1 else np.zeros(per_example.shape[1:], dtype=np.float32),
                              resample_jaccard=jaccards.astype(np.float32), stable=stable)
