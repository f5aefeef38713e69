"""How circuits form across checkpoints: similarity, emergence and phase changes.

Pure functions on plain numpy arrays (masks and score matrices stacked over steps), and
``track(study)`` which applies them to a study and returns a ``Tracking`` with every series
plus a JSON-able ``to_dict()`` (schema in docs/tracking.md).

Definitions (masks are boolean arrays of any shape, e.g. the circuit's ``[n_forward,
n_backward]`` edge mask at one step):

- ``jaccard(a, b) = |a & b| / |a | b|`` (1.0 when both are empty);
- ``weighted_jaccard(wa, wb) = sum(min(wa, wb)) / sum(max(wa, wb))`` over non-negative
  weights (for circuits: ``|score| * in_circuit``, Tigges et al. 2024);
- ``edit_distance(a, b) = (added, removed)``: edges in ``b`` not in ``a`` and in ``a`` not in
  ``b`` (graph edit distance restricted to edge insertions and deletions on a fixed node set);
- ``emergence_steps(masks, steps)``: per element, the first step after which it stays in the
  circuit up to the last step; ``-1`` for elements not in the final circuit;
- ``change_points(curve, steps)``: phase changes found by ruptures (see its docstring).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from circuits.errors import CircuitsError
from circuits.graph import format_node, parse_node

# ---------------------------------------------------------------- similarity between circuits


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def weighted_jaccard(wa: np.ndarray, wb: np.ndarray) -> float:
    wa, wb = np.abs(np.asarray(wa, dtype=float)), np.abs(np.asarray(wb, dtype=float))
    top = np.maximum(wa, wb).sum()
    return 1.0 if top == 0 else float(np.minimum(wa, wb).sum() / top)


def edit_distance(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(added, removed) going from mask ``a`` to mask ``b``; their sum is the edit distance."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return int((b & ~a).sum()), int((a & ~b).sum())


def adjacent(fn, stack: np.ndarray) -> np.ndarray:
    """``fn(stack[i-1], stack[i])`` for i >= 1, NaN at i = 0: one value per step."""
    out = np.full(len(stack), np.nan)
    for i in range(1, len(stack)):
        out[i] = fn(stack[i - 1], stack[i])
    return out


def against_final(fn, stack: np.ndarray) -> np.ndarray:
    return np.array([fn(stack[i], stack[-1]) for i in range(len(stack))], dtype=float)


def emergence_steps(masks: np.ndarray, steps: np.ndarray | list[int]) -> np.ndarray:
    """Per element of ``masks[0]``: the first step from which it is in every later mask, else -1."""
    masks = np.asarray(masks, dtype=bool)
    steps = np.asarray(steps)
    if len(masks) != len(steps):
        raise ValueError(f"{len(masks)} masks but {len(steps)} steps")
    # stays[i] = mask true at i and at every later step: a reversed cumulative AND.
    stays = np.flip(np.logical_and.accumulate(np.flip(masks, 0), axis=0), 0)
    first = np.argmax(stays, axis=0)
    out = steps[first].astype(np.int64)
    out[~stays[-1]] = -1
    return out


# ---------------------------------------------------------------- nodes of the graph


def node_of(name: str) -> str:
    """``a1.h2<k>`` -> ``a1.h2``: the node a reader port belongs to (names owned by circuits.graph)."""
    return parse_node(name).node


def node_masks(
    edge_masks: np.ndarray, forward_names: list[str], backward_names: list[str]
) -> tuple[list[str], np.ndarray]:
    """(node names, [n_steps, n_nodes] bool): a node is in when any of its edges is."""
    edge_masks = np.asarray(edge_masks, dtype=bool)
    nodes = list(dict.fromkeys([*forward_names, *(node_of(n) for n in backward_names)]))
    index = {n: i for i, n in enumerate(nodes)}
    out = np.zeros((edge_masks.shape[0], len(nodes)), dtype=bool)
    # asarray: numpy's stub types ``any(axis=...)`` as possibly a scalar; on a 3-d array it never is.
    writes = np.asarray(edge_masks.any(axis=2))  # [step, forward]
    reads = np.asarray(edge_masks.any(axis=1))  # [step, backward]
    for j, name in enumerate(forward_names):
        out[:, index[name]] |= writes[:, j]
    for j, name in enumerate(backward_names):
        out[:, index[node_of(name)]] |= reads[:, j]
    return nodes, out


# ---------------------------------------------------------------- phase changes


@dataclass
class ChangePoint:
    """One phase change of a curve: where it happens and the window over which it happens."""

    curve: str
    step: int  # first step at which the curve is past the midpoint of the change
    start_step: int  # last checkpoint of the level before the change
    end_step: int  # first checkpoint of the level after it
    before: float  # curve value at start_step
    after: float  # curve value at end_step
    share: float  # |after - before| / range of the whole curve
    direction: str  # "rise" or "fall"
    circuit: dict[str, Any] = field(default_factory=dict)  # circuit changes inside the window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fill_nan(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=float).copy()
    bad = ~np.isfinite(y)
    if bad.all():
        return np.zeros_like(y)
    if bad.any():
        idx = np.arange(len(y))
        y[bad] = np.interp(idx[bad], idx[~bad], y[~bad])
    return y


def change_points(
    curve: np.ndarray,
    steps: np.ndarray | list[int],
    name: str = "curve",
    min_share: float = 0.2,
    resolution: float = 0.02,
    min_rate: float = 1.0,
    floor: float = 0.0,
) -> list[ChangePoint]:
    """Phase changes of ``curve`` (one value per checkpoint), found by change-point detection.

    The curve, scaled to [0, 1] over its range, is cut into continuous piecewise-linear
    segments by ruptures' PELT search with the ``clinear`` cost; the penalty is BIC-like,
    ``3 * sigma^2 * log(n)``, with sigma the curve's noise level estimated from its second
    differences (median absolute deviation), floored at ``resolution``. A segment is a phase
    change when the curve moves by at least ``min_share`` of its range over it, at least
    ``min_rate`` times as fast (per training step) as the curve's range spread over the whole
    run: a slow drift is not a phase change. Adjacent phase segments moving the same way merge
    into one window. ``floor`` is the smallest range worth scaling to (a head score that moves
    between 0 and 0.03 is noise, not a curve to normalise: give ``floor=0.5`` for scores in
    [0, 1]). Segments are on the checkpoint index,
    so a change is located to within the checkpoints around it: ``start_step`` and
    ``end_step`` are the checkpoints that bound the window.
    """
    import ruptures

    steps = np.asarray(steps)
    y = _fill_nan(curve)
    n = len(y)
    if n < 5:
        return []
    lo, hi = float(y.min()), float(y.max())
    if hi - lo <= 1e-12:
        return []
    z = (y - lo) / max(hi - lo, floor)
    second = np.diff(z, 2)
    sigma = float(np.median(np.abs(second - np.median(second)))) / 0.6745 / np.sqrt(6.0)
    sigma = max(sigma, resolution)
    penalty = 3.0 * sigma**2 * np.log(n)
    bkps = ruptures.Pelt(model="clinear", min_size=2, jump=1).fit(z).predict(pen=penalty)
    # clinear segments are lines between knots: a breakpoint b puts a knot at index b - 1.
    bounds = [0, *[b - 1 for b in bkps if 1 < b < n], n - 1]
    segments = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b <= a:
            continue
        segments.append((a, b, z[b] - z[a]))
    span = max(float(steps[-1] - steps[0]), 1.0)
    merged: list[list] = []
    for a, b, d in segments:
        rate = abs(d) / max(float(steps[b] - steps[a]), 1.0)
        big = abs(d) >= min_share and rate >= min_rate / span
        if merged and big and merged[-1][3] and np.sign(merged[-1][2]) == np.sign(d):
            merged[-1][1] = b
            merged[-1][2] += d
        else:
            merged.append([a, b, d, big])
    out = []
    for a, b, d, big in merged:
        if not big:
            continue
        d = z[b] - z[a]
        if abs(d) < min_share:
            continue
        mid = z[a] + d / 2
        inside = np.arange(a, b + 1)
        past = inside[(z[inside] - mid) * np.sign(d) >= 0]
        at = int(past[0]) if len(past) else b
        out.append(ChangePoint(
            curve=name, step=int(steps[at]), start_step=int(steps[a]), end_step=int(steps[b]),
            before=float(y[a]), after=float(y[b]), share=float(abs(d)),
            direction="rise" if d > 0 else "fall",
        ))
    return out


# ---------------------------------------------------------------- a whole study


def head_name(layer: int, head: int) -> str:
    return format_node("head", layer, head)


@dataclass
class CircuitSeries:
    """The circuit over steps: size, faithfulness, similarity, edit distance, emergence."""

    forward_names: list[str]
    backward_names: list[str]
    nodes: list[str]
    n_edges: np.ndarray  # [n_steps] int
    n_nodes: np.ndarray  # [n_steps] int
    faithfulness: np.ndarray  # [n_steps] float (NaN where not measured)
    jaccard_adjacent: np.ndarray  # [n_steps], NaN at the first step
    jaccard_final: np.ndarray  # [n_steps]
    weighted_jaccard_adjacent: np.ndarray
    weighted_jaccard_final: np.ndarray
    edges_added: np.ndarray  # [n_steps] int, since the previous step (0 at the first)
    edges_removed: np.ndarray
    node_emergence: np.ndarray  # [n_nodes] int step, -1 when not in the final circuit
    edge_emergence: np.ndarray  # [n_forward, n_backward] int step, -1 when not in the final circuit
    in_circuit: np.ndarray  # [n_steps, n_forward, n_backward] bool

    def emergence_order(self) -> list[tuple[str, int]]:
        """Nodes of the final circuit by emergence step (then name)."""
        pairs = [(n, int(s)) for n, s in zip(self.nodes, self.node_emergence, strict=True) if s >= 0]
        return sorted(pairs, key=lambda item: (item[1], item[0]))

    def edge_emergence_order(self) -> list[tuple[str, int]]:
        rows, cols = np.nonzero(self.edge_emergence >= 0)
        pairs = [(f"{self.forward_names[r]}->{self.backward_names[c]}", int(self.edge_emergence[r, c]))
                 for r, c in zip(rows, cols, strict=True)]
        return sorted(pairs, key=lambda item: (item[1], item[0]))


@dataclass
class Tracking:
    """Everything ``track(study)`` measures; ``to_dict()`` is the JSON form (docs/tracking.md)."""

    run: str
    steps: np.ndarray  # [n_steps]
    curves: dict[str, np.ndarray]  # scalar series over steps: metric, loss, progress/..., circuit/...
    heads: dict[str, np.ndarray]  # detector kind -> [n_steps, n_layers, n_heads]
    circuit: CircuitSeries | None
    phases: list[ChangePoint]
    stability: dict[str, Any]

    def top_head(self, kind: str) -> tuple[int, int]:
        """(layer, head) with the highest final score for a detector kind."""
        final = self.heads[kind][-1]
        layer, head = np.unravel_index(int(np.nanargmax(final)), final.shape)
        return int(layer), int(head)

    def head_emergence(self, kind: str) -> int | None:
        """Emergence step in the circuit of the top head of a detector kind (None: not in the final circuit)."""
        if self.circuit is None:
            return None
        name = head_name(*self.top_head(kind))
        if name not in self.circuit.nodes:
            return None
        step = int(self.circuit.node_emergence[self.circuit.nodes.index(name)])
        return step if step >= 0 else None

    def phases_of(self, curve: str) -> list[ChangePoint]:
        return [p for p in self.phases if p.curve == curve]

    def to_dict(self) -> dict[str, Any]:
        steps = [int(s) for s in self.steps]
        out: dict[str, Any] = {
            "schema": "circuits.tracking/1",
            "run": self.run,
            "steps": steps,
            "curves": {k: _list(v) for k, v in self.curves.items()},
            "heads": {
                kind: {
                    "top_head": head_name(*self.top_head(kind)),
                    "final": _list(scores[-1]),
                    "top_head_curve": _list(scores[:, self.top_head(kind)[0], self.top_head(kind)[1]]),
                    "circuit_emergence": self.head_emergence(kind),
                }
                for kind, scores in self.heads.items()
            },
            "phases": [p.to_dict() for p in self.phases],
            "stability": self.stability,
            "circuit": None,
        }
        c = self.circuit
        if c is not None:
            out["circuit"] = {
                "n_edges": _list(c.n_edges),
                "n_nodes": _list(c.n_nodes),
                "faithfulness": _list(c.faithfulness),
                "jaccard_adjacent": _list(c.jaccard_adjacent),
                "jaccard_final": _list(c.jaccard_final),
                "weighted_jaccard_adjacent": _list(c.weighted_jaccard_adjacent),
                "weighted_jaccard_final": _list(c.weighted_jaccard_final),
                "edges_added": _list(c.edges_added),
                "edges_removed": _list(c.edges_removed),
                "node_emergence": [{"node": n, "step": s} for n, s in c.emergence_order()],
                "edge_emergence": [{"edge": e, "step": s} for e, s in c.edge_emergence_order()],
            }
        return out


def _list(x) -> Any:
    """numpy -> JSON: NaN and inf become None."""
    arr = np.asarray(x)
    if arr.dtype.kind in "iub":
        return arr.tolist()
    return [_list(v) for v in arr] if arr.ndim > 1 else [None if not np.isfinite(v) else float(v) for v in arr]


def circuit_series(
    steps: np.ndarray,
    scores: np.ndarray,
    in_circuit: np.ndarray,
    forward_names: list[str],
    backward_names: list[str],
    faithfulness: np.ndarray | None = None,
) -> CircuitSeries:
    """All circuit measures from stacked ``[n_steps, n_forward, n_backward]`` scores and masks."""
    masks = np.asarray(in_circuit, dtype=bool)
    weights = np.abs(np.nan_to_num(np.asarray(scores, dtype=float))) * masks
    nodes, node_in = node_masks(masks, forward_names, backward_names)
    changes = np.array([(0, 0)] + [edit_distance(masks[i - 1], masks[i]) for i in range(1, len(masks))])
    return CircuitSeries(
        forward_names=list(forward_names),
        backward_names=list(backward_names),
        nodes=nodes,
        n_edges=masks.reshape(len(masks), -1).sum(1),
        n_nodes=node_in.sum(1),
        faithfulness=np.full(len(masks), np.nan) if faithfulness is None else np.asarray(faithfulness, dtype=float),
        jaccard_adjacent=adjacent(jaccard, masks),
        jaccard_final=against_final(jaccard, masks),
        weighted_jaccard_adjacent=adjacent(weighted_jaccard, weights),
        weighted_jaccard_final=against_final(weighted_jaccard, weights),
        edges_added=changes[:, 0],
        edges_removed=changes[:, 1],
        node_emergence=emergence_steps(node_in, steps),
        edge_emergence=emergence_steps(masks, steps),
        in_circuit=masks,
    )


def circuit_changes_in(c: CircuitSeries, steps: np.ndarray, start: int, end: int) -> dict[str, Any]:
    """What the circuit did between two checkpoints (a phase window)."""
    steps = np.asarray(steps)
    i, j = int(np.searchsorted(steps, start)), int(np.searchsorted(steps, end))
    inside = slice(i + 1, j + 1)
    emerged = [n for n, s in c.emergence_order() if start <= s <= end]
    return {
        "edges_added": int(c.edges_added[inside].sum()),
        "edges_removed": int(c.edges_removed[inside].sum()),
        "n_edges_before": int(c.n_edges[i]),
        "n_edges_after": int(c.n_edges[j]),
        "jaccard_start_end": jaccard(c.in_circuit[i], c.in_circuit[j]),
        "nodes_emerged": emerged,
    }


def stability_after(c: CircuitSeries | None, steps: np.ndarray, after_step: int | None) -> dict[str, Any]:
    """How stable the circuit is after ``after_step`` (the end of the first phase change of the metric or loss)."""
    out: dict[str, Any] = {"after_step": after_step}
    if c is None:
        return out
    steps = np.asarray(steps)
    start = steps[0] if after_step is None else after_step
    later = (steps > start)
    jac = c.jaccard_adjacent[later]
    jac = jac[np.isfinite(jac)]
    weighted = c.weighted_jaccard_adjacent[later]
    weighted = weighted[np.isfinite(weighted)]
    out.update({
        "n_steps": int(len(jac)),
        "mean_jaccard_adjacent": float(jac.mean()) if len(jac) else None,
        "min_jaccard_adjacent": float(jac.min()) if len(jac) else None,
        "mean_weighted_jaccard_adjacent": float(weighted.mean()) if len(weighted) else None,
        "final_circuit_complete_at": int(c.node_emergence[c.node_emergence >= 0].max())
        if (c.node_emergence >= 0).any() else None,
    })
    return out


BOUNDED_FLOOR = 0.5  # scores and accuracies live in [0, 1]: a change is measured against at least half of it


def track(study, min_share: float = 0.2) -> Tracking:
    """Cross-checkpoint tracking of a study: curves, head scores, circuit measures, phases.

    Reads from the study (all optional except the steps): ``metric()``, ``loss()``,
    ``progress/*`` scalars, ``heads/*`` ``[n_layers, n_heads]`` scores, and the circuit
    (``circuit/scores``, ``circuit/in_circuit``, ``circuit/faithfulness``). Phase changes are
    searched in the metric, the loss, every scalar progress curve and, per detector kind, the
    curve of the head with the highest final score; each phase carries the circuit changes
    inside its window.
    """
    steps = np.asarray(study.steps)
    curves: dict[str, np.ndarray] = {}
    for name, getter in (("metric", "metric"), ("loss", "loss")):
        try:
            value = getattr(study, getter)()
        except (CircuitsError, AttributeError, KeyError):  # a study without that series
            continue
        if value is not None:
            curves[name] = np.asarray(value, dtype=float)
    for key in _keys(study, "progress"):
        arr = np.asarray(study.array(key), dtype=float)
        if arr.ndim == 1:
            curves[key] = arr
    heads = {key.split("/", 1)[1]: np.asarray(study.array(key), dtype=float) for key in _keys(study, "heads")}

    circuit = None
    if _has(study, "circuit/in_circuit"):
        forward_names, backward_names = _graph_names(study)
        faith = np.asarray(study.array("circuit/faithfulness"), dtype=float) if _has(study, "circuit/faithfulness") else None
        circuit = circuit_series(steps, study.array("circuit/scores"), study.array("circuit/in_circuit"),
                                 forward_names, backward_names, faith)
        curves["circuit/n_edges"] = circuit.n_edges.astype(float)
        if faith is not None:
            curves["circuit/faithfulness"] = faith

    tracked = dict(curves)
    tracked.pop("circuit/n_edges", None)
    tracked.pop("circuit/faithfulness", None)
    for kind, scores in heads.items():
        final = scores[-1]
        layer, head = (int(i) for i in np.unravel_index(int(np.nanargmax(final)), final.shape))
        tracked[f"heads/{kind}/{head_name(layer, head)}"] = scores[:, layer, head]
    phases = []
    for name, curve in tracked.items():
        floor = BOUNDED_FLOOR if name.startswith("heads/") or name.endswith(("_acc", "_share")) else 0.0
        for cp in change_points(curve, steps, name=name, min_share=min_share, floor=floor):
            if circuit is not None:
                cp.circuit = circuit_changes_in(circuit, steps, cp.start_step, cp.end_step)
            phases.append(cp)
    phases.sort(key=lambda cp: (cp.step, cp.curve))
    main = [p for p in phases if p.curve in ("metric", "loss")]
    formed = min((p.end_step for p in main), default=None)  # end of the first phase change
    manifest = getattr(study, "manifest", None)
    return Tracking(
        run=getattr(manifest, "name", "") or "",
        steps=steps, curves=curves, heads=heads, circuit=circuit, phases=phases,
        stability=stability_after(circuit, steps, formed),
    )


def _has(study, key: str) -> bool:
    has = getattr(study, "has", None)
    return bool(has(key)) if has is not None else False


def _keys(study, group: str) -> list[str]:
    """Keys under ``group/`` that the study holds (whatever analyses wrote them)."""
    return sorted(k for k in study.keys(group) if k.startswith(group + "/"))


def _graph_names(study) -> tuple[list[str], list[str]]:
    """Writer and reader-port names of the study's graph, as circuits.graph reads them."""
    from circuits.graph import spec_for_study

    shape = np.asarray(study.array_at(study.steps[-1], "circuit/scores")).shape
    spec = spec_for_study(study, shape)
    return list(spec.forward_names), list(spec.backward_names)


# ---------------------------------------------------------------- the readable report


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summary_text(tracking: Tracking) -> str:
    """The report ``circuits summary`` prints: phases, emergence order, stability."""
    steps = tracking.steps
    lines = [f"run {tracking.run or '?'}: {len(steps)} steps from {int(steps[0])} to {int(steps[-1])}"]
    ends = ", ".join(f"{k} {_fmt(float(v[0]))} -> {_fmt(float(v[-1]))}" for k, v in tracking.curves.items()
                     if k in ("metric", "loss", "progress/icl_score", "progress/test_acc", "circuit/n_edges"))
    if ends:
        lines.append(f"  {ends}")
    lines.append("")
    lines.append("phase changes (window = checkpoints bounding the change):")
    if not tracking.phases:
        lines.append("  none found")
    for p in tracking.phases:
        line = (f"  {p.curve}: {p.direction} {_fmt(p.before)} -> {_fmt(p.after)} at step {p.step} "
                f"(window {p.start_step}-{p.end_step}, {p.share:.0%} of its range)")
        if p.circuit:
            change = p.circuit
            line += (f"; circuit +{change['edges_added']}/-{change['edges_removed']} edges, "
                     f"{change['n_edges_before']} -> {change['n_edges_after']}")
            if change["nodes_emerged"]:
                line += f", nodes emerging: {', '.join(change['nodes_emerged'])}"
        lines.append(line)
    lines.append("")
    lines.append("head detectors (head with the highest final score):")
    for kind, scores in tracking.heads.items():
        layer, head = tracking.top_head(kind)
        curve = scores[:, layer, head]
        line = f"  {kind:<17} {head_name(layer, head)}: {_fmt(float(curve[0]))} -> {_fmt(float(curve[-1]))}"
        if tracking.circuit is not None:
            line += f"; in the circuit from step {_fmt(tracking.head_emergence(kind))}"
        lines.append(line)
    c = tracking.circuit
    if c is not None:
        lines.append("")
        lines.append("emergence order of the final circuit's nodes (step from which each stays):")
        order = c.emergence_order()
        lines.append("  " + (", ".join(f"{n} @{s}" for n, s in order) if order else "(the final circuit is empty)"))
        s = tracking.stability
        lines.append("")
        lines.append(
            f"stability after step {_fmt(s.get('after_step'))}: adjacent Jaccard mean "
            f"{_fmt(s.get('mean_jaccard_adjacent'))}, min {_fmt(s.get('min_jaccard_adjacent'))}, weighted mean "
            f"{_fmt(s.get('mean_weighted_jaccard_adjacent'))} over "
            f"{_fmt(s.get('n_steps'))} steps; final circuit complete at step {_fmt(s.get('final_circuit_complete_at'))}"
        )
        lines.append(f"final circuit: {int(c.n_edges[-1])} edges, {int(c.n_nodes[-1])} nodes, "
                     f"faithfulness {_fmt(float(c.faithfulness[-1]))}")
    return "\n".join(lines)
