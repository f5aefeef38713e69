"""How far to trust the method: a step's edge scores against exact patching.

EAP and EAP-IG approximate what exact activation patching measures (scoring.py). At a few
steps of a sweep (``trust_steps``, default 5, spread over the selected steps, the last
included; only graphs of at most ``trust_max_edges`` edges, default 2,000) the ``circuit``
analysis also runs exact patching and compares, over the valid edges:

- ``spearman_signed`` / ``spearman_abs``: Spearman's rho of the two scorings (ranks with
  ties averaged), on the signed scores and on ``|score|`` (what selection ranks by);
- ``topk_overlap``: with ``k`` the size of the step's circuit, the share of the method's
  top-k edges (by ``|score|``) that are also in exact patching's top-k;
- ``top10_overlap``: the same count for the top ``min(10, n_edges)`` edges;
- ``worst_rank``: the worst exact-patching rank (1 = largest ``|score|``; tied edges share the
  best rank of their group) of an edge of the step's circuit.

**Poor** (the rule the summary applies): the step has a circuit (``k >= 1``) and either
``topk_overlap < 0.7`` or some circuit edge is ranked beyond ``2k`` by exact patching
(``worst_rank > 2k``): an edge near the circuit's boundary may trade places with the next
ones (on the induction run, edges ranked k + 4 by exact patching at 1000 with rho 0.94 on
|score|), but one far outside it says the method chose the circuit wrongly. A step with an empty circuit is never poor: nothing was selected on
the scores. When a step is poor the summary says so and names the remedies: more
integrated-gradient steps (``--ig-steps 30``) or exact scores (``--method patching``).

Stored per step as ``circuit/trust``, float32 ``[8]`` in the order of :data:`TRUST_FIELDS`;
NaN everywhere at steps not checked. Pure numpy, no scipy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

from circuits.errors import CircuitsError

TRUST_KEY = "circuit/trust"
TRUST_FIELDS = ("spearman_signed", "spearman_abs", "topk_overlap", "k", "top10_overlap", "worst_rank", "poor",
                "n_edges")
POOR_OVERLAP = 0.7  # a top-k overlap below this is poor
POOR_RANK = 2.0  # ... and so is a circuit edge ranked beyond POOR_RANK * k by exact patching
TOP = 10
METHOD_NAMES = {"eap": "EAP", "eap-ig": "EAP-IG", "patching": "exact patching"}


@dataclass(frozen=True)
class TrustReport:
    """One step's comparison of the method's edge scores with exact patching (see the module doc).

    ``topk_overlap`` is a share of ``k`` (NaN when ``k`` is 0); ``top10_overlap`` a count out
    of ``top`` = ``min(10, n_edges)``; ``worst_rank`` NaN when the circuit is empty.
    """

    spearman_signed: float
    spearman_abs: float
    topk_overlap: float
    k: int
    top10_overlap: int
    worst_rank: float
    poor: bool
    n_edges: int
    step: int | None = None

    @property
    def top(self) -> int:
        return min(TOP, self.n_edges)

    def to_array(self) -> Float[np.ndarray, " 8"]:
        """The stored layout, float32 in the order of TRUST_FIELDS."""
        return np.asarray([getattr(self, name) for name in TRUST_FIELDS], dtype=np.float32)

    @classmethod
    def from_array(cls, values: np.ndarray, step: int | None = None) -> TrustReport | None:
        """A stored ``circuit/trust``; None for a step that was not checked (all NaN)."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(TRUST_FIELDS),):
            raise CircuitsError(f"{TRUST_KEY} has shape {values.shape}, expected ({len(TRUST_FIELDS)},)")
        if np.isnan(values).all():
            return None
        f = dict(zip(TRUST_FIELDS, values, strict=True))
        return cls(float(f["spearman_signed"]), float(f["spearman_abs"]), float(f["topk_overlap"]), int(f["k"]),
                   int(f["top10_overlap"]), float(f["worst_rank"]), bool(f["poor"]), int(f["n_edges"]), step)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def not_checked() -> Float[np.ndarray, " 8"]:
    """``circuit/trust`` at a step without a check: every field NaN (the same shape at every step)."""
    return np.full(len(TRUST_FIELDS), np.nan, dtype=np.float32)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (ascending), tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_values))[0] + 1]
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with ties averaged (scipy.stats.spearmanr's default); NaN if either is constant."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2.0, average_ranks(b) - (len(b) + 1) / 2.0
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def descending_ranks(values: np.ndarray) -> np.ndarray:
    """Rank 1 for the largest value; tied values share the best rank of their group."""
    values = np.asarray(values, dtype=np.float64)
    return 1 + (values[None, :] > values[:, None]).sum(1)


def compare_scores(
    method_scores: Float[np.ndarray, "n_forward n_backward"],
    exact_scores: Float[np.ndarray, "n_forward n_backward"],
    valid: Bool[np.ndarray, "n_forward n_backward"],
    circuit_mask: Bool[np.ndarray, "n_forward n_backward"],
    step: int | None = None,
) -> TrustReport:
    """The method's scores against exact patching over the ``valid`` edges (see the module doc)."""
    shapes = {np.shape(method_scores), np.shape(exact_scores), np.shape(valid), np.shape(circuit_mask)}
    if len(shapes) != 1:
        raise CircuitsError(f"compare_scores: scores, valid and circuit must have one shape, got {sorted(shapes)}")
    valid = np.asarray(valid, dtype=bool)
    n = int(valid.sum())
    if n < 2:
        raise CircuitsError(f"compare_scores: {n} valid edge(s); a rank comparison needs at least 2")
    m = np.asarray(method_scores, dtype=np.float64)[valid]
    e = np.asarray(exact_scores, dtype=np.float64)[valid]
    in_circuit = np.asarray(circuit_mask, dtype=bool)[valid]
    rank_m, rank_e = descending_ranks(np.abs(m)), descending_ranks(np.abs(e))
    k = int(in_circuit.sum())
    top = min(TOP, n)
    top10 = min(top, int(((rank_m <= top) & (rank_e <= top)).sum()))
    if k:
        topk = min(k, int(((rank_m <= k) & (rank_e <= k)).sum())) / k
        worst = float(rank_e[in_circuit].max())
        poor = topk < POOR_OVERLAP or worst > POOR_RANK * k
    else:
        topk, worst, poor = float("nan"), float("nan"), False
    return TrustReport(spearman(m, e), spearman(np.abs(m), np.abs(e)), float(topk), k, top10, worst, bool(poor), n,
                       step)


def trust_check(fm, task, method_scores: np.ndarray, circuit_mask: np.ndarray, step: int | None = None
                ) -> TrustReport:
    """Exact patching of every edge of ``fm`` (a FunctionalModel) on ``task``, compared with
    ``method_scores``; the exact score is the mean over examples, as every method's is."""
    from circuits.discovery.scoring import score_patching

    exact = score_patching(fm, task).mean(0, dtype=np.float64).astype(np.float32)
    return compare_scores(method_scores, exact, fm.spec.valid, circuit_mask, step)


# ---------------------------------------------------------------- reading a study


def trust_from_study(study) -> list[TrustReport]:
    """Every checked step's report (``circuit/trust`` not NaN), in step order; [] when the study
    has no trust check (no circuit, checks off, or made before they existed)."""
    if not study.has(TRUST_KEY):
        return []
    values = np.asarray(study.array(TRUST_KEY), dtype=np.float64)
    reports = [TrustReport.from_array(row, int(step)) for step, row in zip(study.steps, values, strict=True)]
    return [r for r in reports if r is not None]


def trust_settings(study) -> dict[str, Any]:
    """What :func:`trust_text` needs besides the reports, from the study's recorded options."""
    options = study.provenance.get("options", {}) or {}
    return {"method": options.get("method"), "ig_steps": options.get("ig_steps"),
            "trust_steps": options.get("trust_steps"), "max_edges": options.get("trust_max_edges"),
            "has_circuit": study.has("circuit/scores")}


def method_label(method: str | None, ig_steps: int | None) -> str:
    """``EAP-IG(5)``, ``EAP``: how the summary names a scoring method."""
    name = METHOD_NAMES.get(method or "", str(method))
    return f"{name}({ig_steps})" if method == "eap-ig" and ig_steps else name


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.{digits}f}"


def trust_text(reports: list[TrustReport], method: str | None, ig_steps: int | None, *,
               trust_steps: int | None = None, max_edges: int | None = None, has_circuit: bool = True) -> list[str]:
    """The summary's lines on how far to trust the method's scores (none without a circuit)."""
    if not method or method == "none" or not has_circuit:
        return []
    if method == "patching":
        return ["how far to trust the scores: they are exact patching (nothing to check)"]
    label = method_label(method, ig_steps)
    if not reports:
        if trust_steps is None:
            why = "this study was swept before trust checks existed; sweep it again into a new --out to get them"
        elif trust_steps == 0:
            why = "checks were off (--trust-steps 0)"
        else:
            why = f"the graph has more than --trust-max-edges {max_edges} edges (exact patching would cost too much)"
        return [f"how far to trust {label}: not checked against exact patching ({why})"]
    lines = [f"how far to trust {label} (against exact patching at {len(reports)} step(s); poor = top-k overlap "
             f"< {POOR_OVERLAP} or a circuit edge ranked beyond {POOR_RANK:g}k by exact patching, k = circuit size):"]
    for r in reports:
        line = (f"  step {r.step}: {label} vs exact: rho {_num(r.spearman_signed)} signed, "
                f"{_num(r.spearman_abs)} on |score|, top-{r.top} overlap {r.top10_overlap}/{r.top}")
        if r.k:
            line += (f", top-{r.k} (circuit) overlap {round(r.topk_overlap * r.k)}/{r.k}, worst exact rank of a "
                     f"circuit edge {int(r.worst_rank)} of {r.n_edges}")
        else:
            line += ", empty circuit"
        lines.append(line + (" - POOR" if r.poor else ""))
    poor = [r for r in reports if r.poor]
    if poor:
        steps = ", ".join(str(r.step) for r in poor)
        remedy = ("re-sweep with more integration steps (--ig-steps 30) or exact scores (--method patching)"
                  if method == "eap-ig" else
                  "re-sweep with --method eap-ig --ig-steps 30, or exact scores (--method patching)")
        lines.append(f"  poor at step(s) {steps}: {label} misranks the circuit's edges there; {remedy}")
    return lines
