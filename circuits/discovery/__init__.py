"""Circuit discovery: score every edge, select a circuit, measure its faithfulness.

    from circuits.discovery import discover
    result = discover(model, task, method="eap-ig", ig_steps=5)   # smallest circuit with faithfulness >= 0.8
    result.to_digraph()                                            # networkx view

Files: ``functional.py`` (a forward over the bridge's weights where each edge is a switch,
checked against the bridge on a probe batch), ``support.py`` (every config field honoured,
refused or irrelevant),
``scoring.py`` (eap, eap-ig, patching), ``selection.py`` (top-n, threshold, greedy, prune),
``faithfulness.py`` (ablate outside the circuit), ``analysis.py`` (the sweep's per-step
``circuit`` analysis). Timings against TL 4.3: ``circuits/bench/discover.py``. Conventions:
docs/discovery.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from circuits.config import (
    NODE_EXACT_MAX,
    STABLE_SHARE,
    check_node_effects,
    check_resamples,
    check_stable_share,
    check_target,
    parse_memory,
)
from circuits.discovery import selection as sel
from circuits.discovery.budget import make_budget
from circuits.discovery.faithfulness import GAP_TOL, GAP_Z, Evaluator, faithfulness
from circuits.discovery.functional import FunctionalModel
from circuits.discovery.scoring import (
    METHODS,
    References,
    check_scoring,
    check_task,
    score_edges,
    score_edges_per_example,
)
from circuits.discovery.uncertainty import CircuitUncertainty, resample_circuits
from circuits.errors import CircuitsError
from circuits.graph import GraphSpec, to_digraph
from circuits.tasks import Task
from circuits.timing import phase

SELECTIONS = ("faithful", "topn", "threshold", "greedy")

__all__ = ["CircuitResult", "discover", "score_edges", "faithfulness", "smallest_faithful", "FunctionalModel",
           "METHODS", "SELECTIONS"]


@dataclass
class CircuitResult:
    """A discovered circuit and how good it is.

    ``scores`` float32 [n_forward, n_backward] (0 where ``spec.valid`` is False; see
    scoring.py for the sign), ``in_circuit`` bool of the same shape. ``faithfulness`` is NaN
    with ``gap_nil`` True when the clean and corrupted metrics do not differ. ``reached``
    says whether the faithfulness target was met (selection "faithful"); ``message`` says
    why not. ``metric_clean`` / ``metric_corrupted`` are the full model's.
    """

    scores: np.ndarray
    in_circuit: np.ndarray
    faithfulness: float
    n_edges: int
    metric_clean: float
    metric_corrupted: float
    method: str
    spec: GraphSpec
    selection: str = "faithful"
    ablation: str = "corrupt"
    target: float | None = None
    reached: bool | None = None
    gap_nil: bool = False
    message: str = ""
    size: int | None = None  # the top-n / greedy n that selected the circuit (None for a threshold)
    uncertainty: CircuitUncertainty | None = None  # the bootstrap over examples, when asked for
    # Each example's node contributions [n_examples, n_forward] (see node_effects), when asked for;
    # exact: by ablating each writer, else the sum of its edges' attribution scores.
    node_effects: np.ndarray | None = None
    node_effects_exact: bool = False
    tried: list[tuple[int, float]] = field(default_factory=list)

    @property
    def n_edges_total(self) -> int:
        return self.spec.n_edges

    def edges(self) -> list[str]:
        """Names of the circuit's edges, highest |score| first."""
        idx = np.argwhere(self.in_circuit)
        order = np.argsort(-np.abs(self.scores[idx[:, 0], idx[:, 1]]), kind="stable")
        return [f"{self.spec.forward_names[i]}->{self.spec.backward_names[j]}" for i, j in idx[order]]

    def to_digraph(self, only_circuit: bool = False):
        attrs = {"method": self.method, "faithfulness": self.faithfulness, "n_edges": self.n_edges,
                 "metric_clean": self.metric_clean, "metric_corrupted": self.metric_corrupted}
        return to_digraph(self.spec, self.scores, self.in_circuit, only_circuit=only_circuit, graph_attrs=attrs)


@dataclass
class FaithfulSearch:
    """What ``smallest_faithful`` found: the circuit, the size n that selected it, and each size tried."""

    mask: np.ndarray
    faithfulness: float
    reached: bool
    tried: list[tuple[int, float]]
    size: int


def smallest_faithful(evaluator: Evaluator, scores: np.ndarray, target: float = 0.8, grow: str = "topn",
                      max_edges: int | None = None, absolute: bool = True) -> FaithfulSearch:
    """The smallest top-n (or greedy) circuit whose faithfulness reaches ``target``.

    Sizes 1, 2, 4, ... up to ``max_edges`` (default: all edges) are evaluated in batched
    forwards (as many per forward as the memory budget holds, stopping at the first group
    that reaches the target: the same answer as evaluating them all), then the gap between the last size below target and the first above it is
    bisected (faithfulness need not be monotone in n, so this finds *a* boundary, as
    Tigges et al.'s search does). When no size reaches the target, the most faithful circuit
    found is returned with ``reached`` False. A nil metric gap returns the empty circuit, NaN
    and False.
    """
    spec = evaluator.fm.spec
    total = spec.n_edges
    limit = total if max_edges is None else max(1, min(int(max_edges), total))
    pick = {"topn": sel.top_n, "greedy": sel.greedy}[grow]

    def circuit(n: int) -> np.ndarray:
        return pick(spec, scores, n, absolute=absolute)

    if evaluator.gap_nil:
        return FaithfulSearch(np.zeros(spec.shape, dtype=bool), float("nan"), False, [], 0)
    sizes = sorted({min(2**i, limit) for i in range(int(np.ceil(np.log2(limit))) + 1)} | {limit})
    # Up the grid a group at a time (as many copies as one forward holds), stopping at the
    # first group that reaches the target: the sizes above it never change the answer.
    group = evaluator.ablator.copies_per_forward()
    masks: list[np.ndarray] = []
    faith = np.empty(0)
    while len(masks) < len(sizes) and not (faith >= target).any():
        with phase("select"):
            new = [circuit(n) for n in sizes[len(masks) : len(masks) + group]]
        masks += new
        faith = np.concatenate([faith, np.atleast_1d(evaluator.faithfulness(np.stack(new)))])
    tried = [(int(m.sum()), float(f)) for m, f in zip(masks, faith, strict=False)]
    hits = np.nonzero(faith >= target)[0]
    if len(hits) == 0:
        best = int(np.nanargmax(faith))
        return FaithfulSearch(masks[best], float(faith[best]), False, tried, sizes[best])
    first = int(hits[0])
    best_mask, best_faith, best_size = masks[first], float(faith[first]), sizes[first]
    lo, hi = (sizes[first - 1] if first > 0 else 0), sizes[first]
    while hi - lo > 1:  # at most log2(limit) forwards
        mid = (lo + hi) // 2
        with phase("select"):
            mask = circuit(mid)
        f = float(evaluator.faithfulness(mask))
        tried.append((int(mask.sum()), f))
        if f >= target:
            hi, best_mask, best_faith, best_size = mid, mask, f, mid
        else:
            lo = mid
    return FaithfulSearch(best_mask, best_faith, True, tried, best_size)


_T = TypeVar("_T")


def _given(value: _T | None, message: str) -> _T:
    """A selection setting that discover() checked up front (before any model work), narrowed for use."""
    if value is None:
        raise CircuitsError(message)
    return value


def discover(
    model,
    task: Task,
    method: str = "eap-ig",
    ig_steps: int = 5,
    selection: str = "faithful",
    target: float = 0.8,
    n_edges: int | None = None,
    threshold: float | None = None,
    ablation: str = "corrupt",
    max_edges: int | None = None,
    grow: str = "topn",
    absolute: bool = True,
    gap_tol: float = GAP_TOL,
    gap_z: float = GAP_Z,
    scores: np.ndarray | None = None,
    resamples: int = 0,
    stable_share: float = STABLE_SHARE,
    seed: int = 0,
    node_effects: str | None = None,
    max_memory: int | str | None = None,
) -> CircuitResult:
    """Score every edge of ``model`` on ``task``, select a circuit, measure its faithfulness.

    ``selection``: "faithful" (smallest circuit with faithfulness >= ``target``, grown by
    ``grow`` = topn or greedy, at most ``max_edges`` edges), "topn" / "greedy" (``n_edges``
    edges), "threshold" (|score| >= ``threshold``). Every selection prunes edges off any
    input-to-logits path. ``ablation``: "corrupt" or "mean"; ``gap_tol`` / ``gap_z`` decide
    when the clean-baseline gap is nil (see faithfulness.py).
    Pass ``scores`` to reuse edge scores already computed for this model and task.
    ``resamples`` > 0 bootstraps the examples that many times (seeded by ``seed``): each
    resample selects by the same rule and size, and ``uncertainty`` holds each edge's inclusion
    frequency and score standard error, the resamples' Jaccard against this circuit, and the
    stable circuit (edges in >= ``stable_share`` of them; see uncertainty.py).
    ``node_effects`` ("exact", "attribution" or "auto"; None: not measured) fills the result's
    ``node_effects``: each writer's metric change when its output is ablated for every reader
    (exact: one ablated copy of the batch per writer, same ablation as the faithfulness), or
    its attribution (the sum of its edges' scores, which is EAP's node score); "auto" is exact
    up to ``NODE_EXACT_MAX`` writers. ``max_memory`` bounds the working set of every stacked
    computation (bytes or a size such as ``"2GB"``; default: min(2 GiB, half the available
    memory); see budget.py): the results do not depend on it.
    """
    check_scoring(method, ig_steps)
    if selection not in SELECTIONS:
        raise CircuitsError(f"unknown selection {selection!r}; expected one of: {', '.join(SELECTIONS)}")
    if grow not in ("topn", "greedy"):
        raise CircuitsError(f"unknown grow rule {grow!r}; expected topn or greedy")
    needs_n_edges = f"selection {selection!r} needs n_edges (how many edges to keep)"
    needs_threshold = "selection 'threshold' needs threshold (the smallest |score| kept)"
    if selection in ("topn", "greedy"):
        _given(n_edges, needs_n_edges)
    if selection == "threshold":
        _given(threshold, needs_threshold)
    if selection == "faithful":
        check_target(target, upper=float("inf"))  # a circuit may beat the full model: targets above 1 search on
    if node_effects is not None:
        check_node_effects(node_effects)
    if resamples:
        check_resamples(resamples)
        check_stable_share(stable_share)
        if scores is not None:
            raise CircuitsError("resamples need the per-example scores: leave scores unset to bootstrap")
    check_task(model, task)
    if max_memory is not None:
        parse_memory(max_memory)
    fm = model if isinstance(model, FunctionalModel) else FunctionalModel(model, max_memory=max_memory)
    if max_memory is not None:
        fm.budget = make_budget(max_memory, fm.device)
    spec = fm.spec
    with phase("faithfulness"):  # the full model's clean and corrupted runs, shared from here on
        refs = References.of(fm, task, mean=ablation == "mean")
    per_example = None
    if scores is None:
        per_example = score_edges_per_example(fm, task, method, ig_steps, refs=refs)
        scores = per_example.mean(0, dtype=np.float64).astype(np.float32)
    evaluator = Evaluator(fm, task, ablation, gap_tol, gap_z, refs=refs)
    reached, message, tried, size = None, "", [], None
    if selection == "faithful":
        search = smallest_faithful(evaluator, scores, target, grow, max_edges, absolute)
        mask, faith, reached, tried, size = search.mask, search.faithfulness, search.reached, search.tried, search.size
        if evaluator.gap_nil:
            message = (f"nil metric gap: clean {evaluator.metric_clean:.4g} vs baseline {evaluator.baseline:.4g} "
                       f"(|gap| below {gap_tol} or {gap_z} standard errors, {evaluator.gap_se:.2g}); "
                       "faithfulness is undefined (NaN)")
        elif not reached:
            message = (f"no circuit of at most {max_edges or spec.n_edges} edges reaches faithfulness {target}; "
                       f"returning the most faithful one found ({int(mask.sum())} edges, {faith:.3f})")
    else:
        if selection == "topn":
            size = int(_given(n_edges, needs_n_edges))
            mask = sel.top_n(spec, scores, size, absolute)
        elif selection == "greedy":
            size = int(_given(n_edges, needs_n_edges))
            mask = sel.greedy(spec, scores, size, absolute)
        else:
            mask = sel.threshold(spec, scores, float(_given(threshold, needs_threshold)), absolute)
        faith = float(evaluator.faithfulness(mask))
        if evaluator.gap_nil:
            message = "nil metric gap: faithfulness is undefined (NaN)"
    uncertainty = None
    if resamples and per_example is not None:
        reselect = _same_rule(spec, selection, grow, size, threshold, absolute)
        with phase("select"):
            uncertainty = resample_circuits(per_example, mask, reselect, resamples, stable_share, seed)
        same = bool((uncertainty.stable == mask).all())  # often: then it was measured already
        uncertainty.stable_faithfulness = float(faith) if same else float(evaluator.faithfulness(uncertainty.stable))
    nodes, nodes_exact = None, False
    if node_effects is not None:
        nodes_exact = node_effects == "exact" or (node_effects == "auto" and spec.n_forward <= NODE_EXACT_MAX)
        edge_scores = per_example if per_example is not None else np.asarray(scores)[None]
        nodes = evaluator.node_effects() if nodes_exact else edge_scores.sum(2, dtype=np.float64).astype(np.float32)
    return CircuitResult(
        node_effects=nodes, node_effects_exact=nodes_exact,
        scores=np.asarray(scores, dtype=np.float32), in_circuit=mask.astype(bool), faithfulness=float(faith),
        n_edges=int(mask.sum()), metric_clean=evaluator.metric_clean, metric_corrupted=evaluator.metric_corrupted,
        method=method, spec=spec, selection=selection, ablation=ablation,
        target=target if selection == "faithful" else None, reached=reached, gap_nil=evaluator.gap_nil,
        message=message, tried=tried, size=size, uncertainty=uncertainty,
    )


def _same_rule(spec: GraphSpec, selection: str, grow: str, size: int | None, threshold: float | None,
               absolute: bool) -> Callable[[np.ndarray], np.ndarray]:
    """``scores -> mask`` by the rule and size that chose the full-data circuit (for its resamples)."""
    rule = grow if selection == "faithful" else selection
    if rule == "threshold":
        level = float(_given(threshold, "selection 'threshold' needs threshold"))
        return lambda scores: sel.threshold(spec, scores, level, absolute)
    pick = sel.greedy if rule == "greedy" else sel.top_n
    n = int(size or 0)
    return lambda scores: pick(spec, scores, n, absolute)
