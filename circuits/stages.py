"""Developmental stages of a noisy curve (the LLC over checkpoints): plateaus and turns, with windows.

Hoogland et al. (2024) cut training into stages at the critical points of the LLC curve: where
it stops rising, starts falling, or levels off. With a handful of SGLD chains per checkpoint
the curve is noisy, so a stage boundary needs a noise model and a window. The detector:

1. **Noise.** Each checkpoint's sigma is the larger of its own standard error (over chains) and
   the curve's scatter from one checkpoint to the next (the median absolute deviation of its
   second differences, as ``tracking.change_points`` estimates it): chains share the data
   batches, so their spread alone can understate the noise.
2. **Fit.** A continuous piecewise-linear curve on the checkpoint index (each checkpoint
   weighs the same, whatever the schedule's spacing), knots at checkpoints, least squares
   weighted by 1/sigma^2 (hinge basis ``max(0, i - k)``). Knots are added greedily while one
   lowers chi^2 by more than ``penalty`` (default ``2 ln n``, BIC-like), then each knot is moved
   to its best position given the others, until nothing moves.
3. **Stages.** Each segment is a ``rise``, a ``fall`` or a ``plateau``: a plateau when the fit
   moves by less than ``z`` (default 2) times the noise over the segment,
   ``z * sigma * sqrt(2)``. Adjacent segments of one kind merge. A **boundary** is a knot
   between stages of different kinds: ``peak`` (rise then fall), ``trough`` (fall then rise),
   ``levels off`` (rise or fall, then plateau), ``takes off`` (plateau, then rise or fall);
   and two rises (or falls) in a row stay two stages when one is at least ``rate`` (default 3)
   times steeper per checkpoint: ``steepens`` or ``slows`` (the LLC's slow climb, then its
   steep one through the induction phase change, is such a boundary).
4. **Window.** A boundary's window is every checkpoint the knot could move to with chi^2 within
   ``window_chi2`` (default 4: about two standard deviations) of the best, the other knots held:
   its uncertainty, in steps. On a synthetic curve with noise at 1/15 of its range the true
   turn lies within one checkpoint of that window (tests/test_stages.py).

Pure numpy; ``llc_stages(study)`` reads a study's ``llc/llc_mean`` and ``llc/llc_se``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PLATEAU_Z = 2.0
WINDOW_CHI2 = 4.0
PACE_RATE = 3.0  # two rises (or falls) in a row are two stages when one is this many times steeper


@dataclass
class Stage:
    """A run of checkpoints over which the fitted curve rises, falls or stays level."""

    kind: str  # "rise", "fall" or "plateau"
    start_step: int
    end_step: int
    start_value: float  # the fit at start_step
    end_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageBoundary:
    """Where one stage ends and the next begins, and the window it could be anywhere in."""

    step: int
    window_start: int
    window_end: int
    kind: str  # "peak", "trough", "levels off", "takes off", "steepens" or "slows"
    before: str  # the kind of the stage before
    after: str
    value: float  # the fit at ``step``
    se: float  # the noise (sigma) at ``step``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Stages:
    """The stages of one curve, their boundaries, the fitted curve and the noise used."""

    curve: str
    stages: list[Stage]
    boundaries: list[StageBoundary]
    fit: np.ndarray  # [n_steps]
    sigma: np.ndarray  # [n_steps]
    settings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"curve": self.curve, "settings": self.settings, "stages": [s.to_dict() for s in self.stages],
                "boundaries": [b.to_dict() for b in self.boundaries],
                "fit": [float(v) for v in self.fit], "sigma": [float(v) for v in self.sigma]}


def noise(values: np.ndarray, se: np.ndarray | None = None) -> np.ndarray:
    """Per checkpoint: max(its standard error, the curve's scatter from second differences)."""
    y = np.asarray(values, dtype=float)
    second = np.diff(y, 2)
    scatter = float(np.median(np.abs(second - np.median(second)))) / 0.6745 / np.sqrt(6.0) if len(second) else 0.0
    floor = max(scatter, 1e-9 * max(float(np.ptp(y)), 1.0))
    own = np.zeros_like(y) if se is None else np.nan_to_num(np.asarray(se, dtype=float), nan=0.0)
    return np.maximum(own, floor)


def _design(n: int, knots: list[int]) -> np.ndarray:
    i = np.arange(n, dtype=float)
    return np.column_stack([np.ones(n), i, *[np.maximum(0.0, i - k) for k in sorted(knots)]])


def fit_knots(y: np.ndarray, sigma: np.ndarray, knots: list[int]) -> tuple[np.ndarray, float]:
    """(fit, chi^2) of the continuous piecewise-linear least-squares fit with ``knots``."""
    x = _design(len(y), knots)
    w = 1.0 / sigma
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    fit = x @ coef
    return fit, float((((y - fit) / sigma) ** 2).sum())


def choose_knots(y: np.ndarray, sigma: np.ndarray, penalty: float) -> list[int]:
    """Greedy knot insertion while chi^2 drops by more than ``penalty``, then knots moved to their best place."""
    n = len(y)
    candidates = range(1, n - 1)
    knots: list[int] = []
    _, chi2 = fit_knots(y, sigma, knots)
    while True:
        trials = [(fit_knots(y, sigma, [*knots, k])[1], k) for k in candidates if k not in knots]
        if not trials:
            break
        best, k = min(trials)
        if chi2 - best <= penalty:
            break
        knots, chi2 = sorted([*knots, k]), best
    for _ in range(n):  # coordinate descent: each knot to its best position, the others held
        moved = False
        for j in range(len(knots)):
            others = knots[:j] + knots[j + 1:]
            options = [(fit_knots(y, sigma, [*others, k])[1], k) for k in candidates if k not in others]
            best, k = min(options)
            if best < chi2 - 1e-9 and k != knots[j]:
                knots, chi2, moved = sorted([*others, k]), best, True
                break
        if not moved:
            break
    return knots


def _turns(fit: np.ndarray, a: int, k: int, b: int, rate: float) -> bool:
    """Segments [a, k] and [k, b] of one direction: does the slope change by ``rate`` times or more?"""
    before, after = (fit[k] - fit[a]) / (k - a), (fit[b] - fit[k]) / (b - k)
    slow, fast = sorted((abs(before), abs(after)))
    return fast >= rate * max(slow, 1e-12)


def _kind(change: float, threshold: float) -> str:
    return "plateau" if abs(change) < threshold else ("rise" if change > 0 else "fall")


BOUNDARY_KINDS = {("rise", "fall"): "peak", ("fall", "rise"): "trough", ("rise", "plateau"): "levels off",
                  ("fall", "plateau"): "levels off", ("plateau", "rise"): "takes off",
                  ("plateau", "fall"): "takes off"}


def find_stages(values: np.ndarray, steps: np.ndarray | list[int], se: np.ndarray | None = None,
                curve: str = "llc", z: float = PLATEAU_Z, penalty: float | None = None,
                window_chi2: float = WINDOW_CHI2, rate: float = PACE_RATE) -> Stages:
    """The stages of ``values`` (one per checkpoint at ``steps``) with boundaries and windows (module doc)."""
    steps = np.asarray(steps)
    y = np.asarray(values, dtype=float)
    good = np.isfinite(y)
    if good.sum() < 3:
        return Stages(curve, [], [], np.full(len(y), np.nan), np.full(len(y), np.nan))
    if not good.all():  # a step without an estimate: fit the rest
        idx = np.arange(len(y))
        y = np.interp(idx, idx[good], y[good])
    sigma = noise(y, se)
    n = len(y)
    penalty = 2.0 * np.log(n) if penalty is None else penalty
    knots = choose_knots(y, sigma, penalty)
    fit, chi2 = fit_knots(y, sigma, knots)
    bounds = [0, *knots, n - 1]
    threshold = z * float(np.median(sigma)) * np.sqrt(2.0)
    merged: list[list[Any]] = []  # [kind, start index, end index]
    for a, b in zip(bounds, bounds[1:], strict=False):
        kind = _kind(fit[b] - fit[a], threshold)
        if merged and merged[-1][0] == kind and (kind == "plateau" or not _turns(fit, merged[-1][1], a, b, rate)):
            merged[-1][2] = b
        else:
            merged.append([kind, a, b])
    stages = [Stage(k, int(steps[a]), int(steps[b]), float(fit[a]), float(fit[b])) for k, a, b in merged]
    kept = [m[1] for m in merged[1:]]  # the knots that separate stages of different kinds
    boundaries = []
    for (before, _, _), (after, a, _) in zip(merged, merged[1:], strict=False):
        lo, hi = _window(y, sigma, kept, a, chi2_limit=fit_knots(y, sigma, kept)[1] + window_chi2)
        kind = BOUNDARY_KINDS.get((before, after)) or _pace(fit, merged, a)
        boundaries.append(StageBoundary(int(steps[a]), int(steps[lo]), int(steps[hi]), kind,
                                        before, after, float(fit[a]), float(sigma[a])))
    return Stages(curve, stages, boundaries, fit, sigma,
                  {"z": z, "penalty": float(penalty), "window_chi2": window_chi2, "rate": rate, "chi2": chi2,
                   "n_knots": len(knots)})


def _pace(fit: np.ndarray, merged: list[list[Any]], knot: int) -> str:
    """'steepens' or 'slows': a boundary between two stages of one direction at different rates."""
    i = next(j for j, m in enumerate(merged) if m[1] == knot)
    (_, a, k), (_, _, b) = merged[i - 1], merged[i]
    return "steepens" if abs(fit[b] - fit[k]) / (b - k) > abs(fit[k] - fit[a]) / (k - a) else "slows"


def _window(y: np.ndarray, sigma: np.ndarray, knots: list[int], knot: int, chi2_limit: float) -> tuple[int, int]:
    """The checkpoints around ``knot`` it can move to (others held) with chi^2 <= ``chi2_limit``."""
    others = [k for k in knots if k != knot]
    left = max([k for k in others if k < knot], default=0)
    right = min([k for k in others if k > knot], default=len(y) - 1)
    lo = hi = knot
    while lo - 1 > left and fit_knots(y, sigma, [*others, lo - 1])[1] <= chi2_limit:
        lo -= 1
    while hi + 1 < right and fit_knots(y, sigma, [*others, hi + 1])[1] <= chi2_limit:
        hi += 1
    return lo, hi


def llc_stages(study) -> Stages | None:
    """The stages of a study's LLC curve (``llc/llc_mean``, noise from ``llc/llc_se``); None without one."""
    has = getattr(study, "has", None)
    if has is None or not has("llc/llc_mean"):
        return None
    values = np.asarray(study.array("llc/llc_mean"), dtype=float)
    se = np.asarray(study.array("llc/llc_se"), dtype=float) if has("llc/llc_se") else None
    return find_stages(values, study.steps, se, curve="llc")
