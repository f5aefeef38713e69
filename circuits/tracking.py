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

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Float

from circuits.errors import CircuitsError
from circuits.graph import edge_name, format_node, jaccard, parse_edge, parse_node
from circuits.stages import Stages, llc_stages

# ---------------------------------------------------------------- similarity between circuits


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


MATERIAL = 0.1  # an edge's share of the step's effect is material at >= 10% of its final share, same sign


def material_emergence(shares: np.ndarray, masks: np.ndarray, steps: np.ndarray | list[int],
                       material: float = MATERIAL) -> np.ndarray:
    """Per edge of the final circuit: the first step at which it is in the circuit and from which
    its share of the effect stays material (>= ``material`` x its final share, same sign); -1 else.

    ``shares`` [n_steps, ...] are edge scores divided by each step's gap (NaN where there is no
    gap); ``masks`` the circuit at each step (empty where a step has none). Unlike staying in
    the circuit at every later step, this does not reset on one step whose selection wavers.
    """
    shares = np.asarray(shares, dtype=float)
    masks = np.asarray(masks, dtype=bool)
    final = shares[-1]
    with np.errstate(invalid="ignore"):
        holds = np.nan_to_num(shares * np.sign(final), nan=-np.inf) >= material * np.abs(final)
    stays = np.flip(np.logical_and.accumulate(np.flip(holds, 0), axis=0), 0)
    candidates = stays & masks
    out = np.asarray(steps)[np.argmax(candidates, axis=0)].astype(np.int64)
    out[~(candidates.any(0) & masks[-1])] = -1
    return out


def node_emergence_from_edges(edge_emergence: np.ndarray, nodes: list[str], forward_names: list[str],
                              backward_names: list[str]) -> np.ndarray:
    """A node emerges with its first emerging edge (in or out); -1 when no edge of it is in the final circuit."""
    out = np.full(len(nodes), -1, dtype=np.int64)
    index = {n: i for i, n in enumerate(nodes)}
    for r, c in zip(*np.nonzero(edge_emergence >= 0), strict=True):
        step = int(edge_emergence[r, c])
        for node in (forward_names[r], node_of(backward_names[c])):
            i = index[node]
            out[i] = step if out[i] < 0 else min(out[i], step)
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


# ---------------------------------------------------------------- something to explain

GAP_Z = 3.0  # a step has an effect to explain when its gap is this many standard errors from 0
REPRODUCIBLE = 0.6  # ... and its circuit comes back under resampling (mean resample Jaccard)
ROLE_FLOOR = 0.1  # a detector role is material when its top head rises this far above step 0


@dataclass
class Explanandum:
    """Per step: is there an effect to explain, and is the circuit that explains it reproducible?

    ``gap`` is the mean over prompts of (clean metric - corrupted metric), ``gap_se`` its
    standard error (from the per-prompt differences), ``z = gap / gap_se``, ``share`` =
    |gap| / the study's largest |gap|, ``reproducibility`` the mean Jaccard of the bootstrap
    resamples' circuits against the step's circuit (NaN without a circuit). A step *has a
    circuit* when |z| >= ``gap_z``, ``share`` >= ``gap_floor`` and, where a circuit was
    searched, reproducibility >= ``reproducible``. Decided when reading, so a resumed or
    growing study stays right.
    """

    gap: np.ndarray
    gap_se: np.ndarray
    z: np.ndarray
    share: np.ndarray
    reproducibility: np.ndarray
    has_circuit: np.ndarray  # [n_steps] bool
    gap_z: float = GAP_Z
    reproducible: float = REPRODUCIBLE
    gap_floor: float = 0.0

    def gap_text(self, i: int) -> str:
        """Step ``i``'s effect as the summary states it: 'gap 0.123 +- 0.05 (z 2.1, 5.0% of the
        largest gap), reproducibility 0.30'."""
        repro = "" if not np.isfinite(self.reproducibility[i]) else f", reproducibility {self.reproducibility[i]:.2f}"
        return (f"gap {self.gap[i]:.3g} +- {self.gap_se[i]:.2g} (z {self.z[i]:.1f}, {self.share[i]:.1%} of the "
                f"largest gap){repro}")

    def to_dict(self) -> dict[str, Any]:
        return {"rule": {"gap_z": self.gap_z, "reproducible": self.reproducible, "gap_floor": self.gap_floor},
                "gap": _list(self.gap), "gap_se": _list(self.gap_se), "z": _list(self.z), "share": _list(self.share),
                "reproducibility": _list(self.reproducibility), "has_circuit": _list(self.has_circuit)}


def check_rule(gap_z: float, reproducible: float, gap_floor: float) -> None:
    """Refuse thresholds outside their range, naming the setting."""
    if not np.isfinite(gap_z) or gap_z < 0:
        raise CircuitsError(f"--gap-z {gap_z}: expected a number of standard errors >= 0 (default {GAP_Z})")
    if not 0.0 <= reproducible <= 1.0:
        raise CircuitsError(f"--reproducible {reproducible}: expected a mean Jaccard in [0, 1] (default {REPRODUCIBLE})")
    if not 0.0 <= gap_floor <= 1.0:
        raise CircuitsError(f"--gap-floor {gap_floor}: expected a share of the largest gap in [0, 1] (default 0)")


def explanandum(clean: np.ndarray, corrupted: np.ndarray, reproducibility: np.ndarray | None = None,
                gap_z: float = GAP_Z, reproducible: float = REPRODUCIBLE, gap_floor: float = 0.0) -> Explanandum:
    """The rule above from per-prompt metrics ``[n_steps, n_examples]`` (clean and corrupted)."""
    check_rule(gap_z, reproducible, gap_floor)
    diff = np.asarray(clean, dtype=float) - np.asarray(corrupted, dtype=float)
    diff = diff.reshape(len(diff), -1)
    n = diff.shape[1]
    gap = diff.mean(1)
    se = diff.std(1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(gap)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, gap / se, np.where(gap == 0, 0.0, np.inf * np.sign(gap)))
    largest = float(np.nanmax(np.abs(gap))) if len(gap) else 0.0
    share = np.abs(gap) / largest if largest > 0 else np.zeros_like(gap)
    repro = np.full(len(gap), np.nan) if reproducibility is None else np.asarray(reproducibility, dtype=float)
    has = (np.abs(z) >= gap_z) & (share >= gap_floor)
    if reproducibility is not None:
        has &= np.nan_to_num(repro, nan=0.0) >= reproducible
    return Explanandum(gap, se, z, share, repro, has, gap_z, reproducible, gap_floor)


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
    node_shares: np.ndarray | None = None  # [n_steps, n_forward]: ablation effect / gap (NaN without a circuit)

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
class Role:
    """A head's detector role over training: its score at the first and last step, and when it formed
    (the first step from which the score stays past half-way from its step-0 value to its final one)."""

    kind: str
    head: str
    start: float
    end: float
    formed: int | None
    after_step: int | None  # the checkpoint before ``formed``: the window it formed in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def material_roles(heads: dict[str, np.ndarray], steps: np.ndarray) -> list[Role]:
    """Heads that take on a detector's role: their score (``heads[kind]`` [n_steps, L, H]) rises at
    least ROLE_FLOOR above step 0 and at least half as far as the kind's strongest head (a flat
    detector has none); by when they formed."""
    steps = np.asarray(steps)
    out = []
    for kind, scores in heads.items():
        rise = scores[-1] - scores[0]
        top = float(np.nanmax(rise)) if rise.size else 0.0
        for layer, head in zip(*np.nonzero(rise >= max(ROLE_FLOOR, 0.5 * top)), strict=True):
            curve = scores[:, layer, head]
            formed = _formed_at(curve, steps)
            name = head_name(int(layer), int(head))
            out.append(Role(kind, name, float(curve[0]), float(curve[-1]), formed,
                            None if formed is None else _step_before(steps, formed)))
    return sorted(out, key=lambda r: (r.formed if r.formed is not None else 1 << 62, r.kind, r.head))


def _formed_at(curve: np.ndarray, steps: np.ndarray) -> int | None:
    halfway = curve[0] + 0.5 * (curve[-1] - curve[0])
    past = np.nan_to_num((curve - halfway) * np.sign(curve[-1] - curve[0]), nan=-1.0) >= 0
    stays = np.flip(np.logical_and.accumulate(np.flip(past)))
    return int(steps[int(np.argmax(stays))]) if stays.any() else None


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
    explained: Explanandum | None = None
    epochs: list[Epoch] = field(default_factory=list)
    leading: list[LeadingIndicators] = field(default_factory=list)
    trust: list[Any] = field(default_factory=list)  # circuits.discovery.trust.TrustReport per checked step
    trust_lines: list[str] = field(default_factory=list)  # what the summary says of them
    # The final stable circuit's edges: score / gap per step ("circuit/share/<edge>"; NaN without a circuit)
    edge_shares: dict[str, np.ndarray] = field(default_factory=dict)
    # Developmental stages of the LLC curve (circuits.stages; None without ``--analyses llc``)
    llc_stages: Stages | None = None

    def roles(self) -> list[Role]:
        """The heads taking on a detector's role (:func:`material_roles`)."""
        return material_roles(self.heads, self.steps)

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
            "explained": None if self.explained is None else self.explained.to_dict(),
            "trust": [r.to_dict() for r in self.trust],
            "roles": [r.to_dict() for r in self.roles()],
            "epochs": [e.to_dict() for e in self.epochs],
            "leading_indicators": [x.to_dict() for x in self.leading],
            "llc_stages": None if self.llc_stages is None else self.llc_stages.to_dict(),
            "llc_vs_epochs": llc_against_epochs(self),
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
                "node_emergence": [{"node": n, "step": s, "after_step": _step_before(self.steps, s)}
                                   for n, s in c.emergence_order()],
                "edge_shares": {e: _list(v) for e, v in self.edge_shares.items()},
                "node_shares": None if c.node_shares is None else
                {n: _list(c.node_shares[:, i]) for i, n in enumerate(c.forward_names)},
                "edge_emergence": [{"edge": e, "step": s, "after_step": _step_before(self.steps, s)}
                                   for e, s in c.edge_emergence_order()],
            }
        return out


def _step_before(steps: np.ndarray, step: int) -> int | None:
    """The checkpoint before ``step``: with it, the window in which something emerged."""
    i = int(np.searchsorted(steps, step))
    return int(steps[i - 1]) if i > 0 else None


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
    gap: np.ndarray | None = None,
    node_effects: Float[np.ndarray, "n_steps n_forward"] | None = None,
) -> CircuitSeries:
    """All circuit measures from stacked ``[n_steps, n_forward, n_backward]`` scores and masks.

    With each step's ``gap``, an edge emerges by :func:`material_emergence` on its share of the
    gap; a writer node likewise on its own share (``node_effects`` / gap: its ablation effect)
    where the study has node effects, else with its first edge, as ``logits`` always does.
    Without a gap, at the first step from which it stays in every later circuit
    (:func:`emergence_steps`).
    """
    masks = np.asarray(in_circuit, dtype=bool)
    node_shares = None
    weights = np.abs(np.nan_to_num(np.asarray(scores, dtype=float))) * masks
    nodes, node_in = node_masks(masks, forward_names, backward_names)
    changes = np.array([(0, 0)] + [edit_distance(masks[i - 1], masks[i]) for i in range(1, len(masks))])
    if gap is None:
        edge_emergence, node_emergence = emergence_steps(masks, steps), emergence_steps(node_in, steps)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = np.asarray(scores, dtype=float) / np.asarray(gap, dtype=float)[:, None, None]
        edge_emergence = material_emergence(shares, masks, steps)
        node_emergence = node_emergence_from_edges(edge_emergence, nodes, list(forward_names), list(backward_names))
        if node_effects is not None:
            node_shares = _node_shares(node_effects, gap, np.asarray(node_in.any(1)))
            writers = len(forward_names)  # nodes list the writers first, then logits
            node_emergence[:writers] = material_emergence(node_shares, node_in[:, :writers], steps)
    return CircuitSeries(
        node_shares=node_shares,
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
        node_emergence=node_emergence,
        edge_emergence=edge_emergence,
        in_circuit=masks,
    )


def _node_shares(node_effects: np.ndarray, gap: np.ndarray, has_circuit: np.ndarray) -> np.ndarray:
    """Each writer's ablation effect over the step's gap; NaN at steps without a circuit."""
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.asarray(node_effects, dtype=float) / np.asarray(gap, dtype=float)[:, None]
    return np.where(has_circuit[:, None], shares, np.nan)


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
        "final_circuit_complete_at": int(c.edge_emergence[c.edge_emergence >= 0].max())
        if (c.edge_emergence >= 0).any() else None,
    })
    return out


# ---------------------------------------------------------------- mechanism epochs

EPOCH_SIMILARITY = 0.6  # a step belongs to an epoch when its circuit is this similar to the epoch's mean circuit


@dataclass
class Epoch:
    """A run of steps with similar stable circuits, or with none (``has_circuit`` False).

    ``added`` and ``dropped`` set the epoch apart from the epoch with a circuit before it: edges of
    its typical circuit (in the stable circuit at >= half of its steps) not in the earlier one's,
    with their mean share of the gap over this epoch, and edges of the earlier typical circuit not
    in this one, with their mean share over the earlier epoch; strongest first.
    """

    start: int
    end: int
    has_circuit: bool
    n_steps: int
    n_edges: int = 0  # edges of the typical circuit
    similarity: float | None = None  # lowest weighted Jaccard of a step's circuit against the epoch's mean
    added: list[dict[str, Any]] = field(default_factory=list)  # {"edge": str, "mean_share": float}
    dropped: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def runs_of(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """``(start, stop, value)`` of each run of equal consecutive flags (``stop`` exclusive)."""
    out: list[tuple[int, int, bool]] = []
    for i, flag in enumerate(np.asarray(flags, dtype=bool)):
        if out and out[-1][2] == bool(flag):
            out[-1] = (out[-1][0], i + 1, bool(flag))
        else:
            out.append((i, i + 1, bool(flag)))
    return out


def _weighted_jaccard_rows(rows: np.ndarray, ref: np.ndarray) -> np.ndarray:
    top = np.maximum(rows, ref).sum(1)
    return np.where(top > 0, np.minimum(rows, ref).sum(1) / np.where(top > 0, top, 1.0), 1.0)


def segment_similar(weights: np.ndarray, similarity: float = EPOCH_SIMILARITY) -> list[tuple[int, int]]:
    """The fewest contiguous segments ``[a, b)`` of the rows of ``weights`` [n, d] (non-negative) such
    that every row has a weighted Jaccard >= ``similarity`` against its segment's mean row; among
    equally few, the one with the highest total similarity (dynamic programming, exact).

    For each end ``j`` the starts are tried by how few segments reach them, fewest first: once
    some start of that count gives a similar segment, starts needing more segments cannot win,
    so most ends check one or two starts instead of all ``j``."""
    weights = np.asarray(weights, dtype=float)
    n = len(weights)
    prefix = np.concatenate([np.zeros((1, weights.shape[1])), np.cumsum(weights, 0)])
    count = np.full(n + 1, n + 1, dtype=np.int64)  # n + 1: not reachable
    total = np.zeros(n + 1)
    start = np.full(n + 1, -1, dtype=np.int64)
    count[0] = 0
    for j in range(1, n + 1):
        for c in np.unique(count[:j][count[:j] <= n]):
            starts = np.nonzero(count[:j] == c)[0]
            low, high = _segment_similarities(weights, prefix, j, starts)
            feasible = low >= similarity
            if not feasible.any():
                continue
            totals = np.where(feasible, total[starts] + high, -np.inf)
            # the highest total; a tie (to rounding) goes to the latest start
            chosen = int(starts[totals >= totals.max() - 1e-9].max())
            count[j], total[j], start[j] = c + 1, total[chosen] + high[starts == chosen][0], chosen
            break
    out, j = [], n
    while j > 0:
        out.append((int(start[j]), j))
        j = int(start[j])
    return out[::-1]


SEGMENT_BLOCK = 2e7  # floats held at once while comparing every segment's rows with its mean


def _segment_similarities(weights: np.ndarray, prefix: np.ndarray, j: int,
                          starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each segment ``[i, j)``, ``i`` in ``starts``: the lowest and the summed weighted Jaccard
    of its rows against its mean row (means from the prefix sums; in blocks of SEGMENT_BLOCK)."""
    first = int(starts.min())
    rows = weights[first:j]  # only rows some segment holds, and columns some row has (the rest add 0)
    used = rows.any(0)
    rows, end = rows[:, used], prefix[j, used]
    low, high = np.empty(len(starts)), np.empty(len(starts))
    block = max(1, int(SEGMENT_BLOCK // max(len(rows) * rows.shape[1], 1)))
    for a in range(0, len(starts), block):
        i = starts[a : a + block]
        means = (end - prefix[i][:, used]) / (j - i)[:, None]  # [segment, d]
        top = np.maximum(rows[None], means[:, None]).sum(2)  # [segment, row]
        sim = np.where(top > 0, np.minimum(rows[None], means[:, None]).sum(2) / np.where(top > 0, top, 1.0), 1.0)
        inside = np.arange(first, j)[None, :] >= i[:, None]
        low[a : a + block] = np.where(inside, sim, np.inf).min(1)
        high[a : a + block] = np.where(inside, sim, 0.0).sum(1)
    return low, high


def mechanism_epochs(shares: np.ndarray, masks: np.ndarray, steps: np.ndarray | list[int],
                     edge_names: list[str] | np.ndarray, similarity: float = EPOCH_SIMILARITY) -> list[Epoch]:
    """Epochs of the mechanism from stacked edge ``shares`` (score / gap) and stable-circuit ``masks``.

    ``shares`` and ``masks`` are ``[n_steps, n_edges]`` (flattened graphs), ``masks`` empty at steps
    without a circuit. A run of steps without a circuit is one epoch (``has_circuit`` False). Each
    run with circuits is cut by :func:`segment_similar` on the contribution vectors ``|share| *
    mask`` restricted to edges in any stable circuit: the fewest epochs in which every step's
    circuit has a weighted Jaccard >= ``similarity`` against its epoch's mean circuit (default 0.6,
    the same bar as a reproducible circuit against its resamples).
    """
    steps = np.asarray(steps)
    shares = np.asarray(shares, dtype=float).reshape(len(steps), -1)
    masks = np.asarray(masks, dtype=bool).reshape(len(steps), -1)
    names = np.asarray(edge_names)
    if not 0.0 < similarity <= 1.0:
        raise CircuitsError(f"epoch similarity {similarity}: expected a weighted Jaccard in (0, 1] "
                            f"(default {EPOCH_SIMILARITY})")
    has = np.asarray(masks.any(1))  # asarray: numpy's stub types any(axis=...) as possibly a scalar
    used = np.asarray(masks.any(0))
    weights = np.abs(np.nan_to_num(shares[:, used])) * masks[:, used]
    spans: list[tuple[int, int, bool]] = []
    for a, b, with_circuit in runs_of(has):  # runs of steps with and without a circuit
        if with_circuit:
            spans += [(a + s, a + e, True) for s, e in segment_similar(weights[a:b], similarity)]
        else:
            spans.append((a, b, False))
    out: list[Epoch] = []
    before: tuple[np.ndarray, np.ndarray] | None = None  # (typical mask, mean shares) of the last epoch with a circuit
    for a, b, with_circuit in spans:
        epoch = Epoch(int(steps[a]), int(steps[b - 1]), with_circuit, b - a)
        if with_circuit:
            typical = masks[a:b].mean(0) >= 0.5
            finite = np.isfinite(shares[a:b])
            total, count = np.where(finite, shares[a:b], 0.0).sum(0), finite.sum(0)
            # The mean over the epoch's steps with a share; 0 for an edge with none (no empty-mean warning).
            mean = np.divide(total, count, out=np.zeros_like(total, dtype=float), where=count > 0)
            sim = _weighted_jaccard_rows(weights[a:b], weights[a:b].mean(0))
            old_mask, old_mean = before if before is not None else (np.zeros_like(typical), np.zeros_like(mean))
            epoch.n_edges = int(typical.sum())
            epoch.similarity = float(sim.min())
            epoch.added = _edge_list(names, typical & ~old_mask, mean)
            epoch.dropped = _edge_list(names, old_mask & ~typical, old_mean)
            before = (typical, mean)
        out.append(epoch)
    return out


def _edge_list(names: np.ndarray, chosen: np.ndarray, mean: np.ndarray) -> list[dict[str, Any]]:
    idx = np.nonzero(chosen)[0]
    idx = idx[np.argsort(-np.abs(mean[idx]), kind="stable")]
    return [{"edge": str(names[i]), "mean_share": float(mean[i])} for i in idx]


# ---------------------------------------------------------------- leading indicators

LEAD_MOVE = 0.1  # a curve's own change starts once it has come 10% of the way toward where it ends


@dataclass
class LeadingIndicators:
    """For one phase change of a target curve: the measures whose own change started earlier.

    Onsets by :func:`onset` (see :func:`leading_indicators`). Each indicator
    is ``{"measure", "onset", "done", "still_moving", "lead_steps", "lead_tokens"}`` (tokens None
    without ``tokens_seen``).
    """

    target: str
    direction: str
    step: int  # the phase change's midpoint step
    start_step: int
    end_step: int
    onset: int  # the target's own onset
    indicators: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def onset(curve: np.ndarray, move: float = LEAD_MOVE, min_move: float = 0.0) -> tuple[int, int] | None:
    """(onset, done) indices of a curve's change toward its last value, or None when it does not change.

    With ``D`` the largest distance of the curve from its last value, the change *starts* at the
    first index from which the curve stays at least ``move * D`` closer to its last value than
    that (a curve that first moves away, as test loss does while a model memorises, is measured
    from its farthest point), and is *done* at the first index from which it stays within
    ``move * D`` of its last value. ``D`` must be at least ``min_move`` (a change too small to count).
    """
    y = _fill_nan(curve)
    dist = np.abs(y - y[-1])
    far = float(dist.max()) if len(dist) else 0.0
    if far <= 1e-12 or far < min_move:
        return None

    def first_for_good(flags: np.ndarray) -> int:
        stays = np.flip(np.logical_and.accumulate(np.flip(flags)))
        return int(np.argmax(stays))

    return first_for_good(dist <= (1 - move) * far), first_for_good(dist <= move * far)


def leading_indicators(target: str, phases: list[ChangePoint], curves: dict[str, np.ndarray], steps: np.ndarray,
                       tokens: np.ndarray | None = None, move: float = LEAD_MOVE,
                       min_share: float = 0.2) -> list[LeadingIndicators]:
    """Per phase change of ``curves[target]``: the other curves whose own change started earlier.

    The target's onset is :func:`onset` over the phase change's window (``move`` = 10%: the first
    step from which it stays 10% of the way from its value at the window's start toward its value
    at the window's end). Every other curve's change is dated by the same rule over the steps from
    the first to the end of the window: the first step from which it stays 10% of its largest
    distance closer to where it is at the window's end. A curve leads when that change is
    material (its largest distance is at least ``min_share`` of its range over the whole run, the
    bar of a phase change; scores in [0, 1] against at least 0.5) and starts before the
    target's. The lead is the target's onset minus the curve's, in steps and, with ``tokens``
    per step, in tokens. Each indicator also says when its change was ``done`` (within 10% of
    where it ends) and whether it was ``still_moving`` when the target's began: restricted loss
    leads the test-loss fall of grokking by thousands of steps and is done before it starts,
    so a finished change is listed, marked, not dropped.
    """
    steps = np.asarray(steps)
    out = []
    for p in sorted((p for p in phases if p.curve == target), key=lambda p: p.step):
        a, b = 0, int(np.searchsorted(steps, p.end_step)) + 1
        span = steps[a:b]
        w = int(np.searchsorted(steps, p.start_step))
        own = onset(curves[target][w:b], move)
        if own is None:
            continue
        t0 = int(steps[w + own[0]])
        entry = LeadingIndicators(target, p.direction, p.step, p.start_step, p.end_step, t0)
        for name, curve in curves.items():
            if name == target:
                continue
            whole = _fill_nan(curve)
            spread = float(whole.max() - whole.min())
            if name.startswith("heads/") or name.endswith(("_acc", "_share")):
                spread = max(spread, BOUNDED_FLOOR)
            got = onset(curve[a:b], move, min_move=min_share * spread)
            if got is None:
                continue
            start, done = int(span[got[0]]), int(span[got[1]])
            if start >= t0:
                continue
            lead_tokens = None
            if tokens is not None:
                ta, tb = int(tokens[a + got[0]]), int(tokens[w + own[0]])
                lead_tokens = tb - ta if ta >= 0 and tb >= 0 else None
            entry.indicators.append({"measure": name, "onset": start, "done": done, "still_moving": done > t0,
                                     "lead_steps": t0 - start, "lead_tokens": lead_tokens})
        entry.indicators.sort(key=lambda d: (-d["lead_steps"], d["measure"]))
        out.append(entry)
    return out


BOUNDED_FLOOR = 0.5  # scores and accuracies live in [0, 1]: a change is measured against at least half of it


def explained_of(study, gap_z: float = GAP_Z, reproducible: float = REPRODUCIBLE,
                 gap_floor: float = 0.0) -> Explanandum | None:
    """The rule of :class:`Explanandum` on a study's stored metrics and resample Jaccards; None
    when the study lacks the clean and corrupted metrics."""
    if not (_has(study, "outputs/metric_clean") and _has(study, "outputs/metric_corrupted")):
        return None
    repro = None
    if _has(study, "circuit/resample_jaccard"):
        with warnings.catch_warnings():  # a step without resamples is all NaN: its mean is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            repro = np.nanmean(np.asarray(study.array("circuit/resample_jaccard"), dtype=float), axis=1)
    return explanandum(study.metric(per_example=True), study.metric_corrupted(per_example=True), repro,
                       gap_z, reproducible, gap_floor)


def track(study, min_share: float = 0.2, gap_z: float = GAP_Z, reproducible: float = REPRODUCIBLE,
          gap_floor: float = 0.0) -> Tracking:
    """Cross-checkpoint tracking of a study: curves, head scores, circuit measures, phases.

    Reads from the study (all optional except the steps): ``metric()``, ``loss()``,
    ``progress/*`` scalars, ``heads/*`` ``[n_layers, n_heads]`` scores, and the circuit
    (``circuit/scores``, ``circuit/in_circuit``, ``circuit/faithfulness``). Phase changes are
    searched in the metric, the loss, every scalar progress curve and, per detector kind, the
    curve of the head with the highest final score; each phase carries the circuit changes
    inside its window.

    The circuit tracked is the stable circuit (``circuit/stable``: edges in most bootstrap
    resamples) at steps that have one by the rule of :class:`Explanandum` (``gap_z``,
    ``reproducible``, ``gap_floor``); other steps have none, so nothing emerges there.
    """
    check_rule(gap_z, reproducible, gap_floor)
    steps = np.asarray(study.steps)
    if steps.size == 0:  # a sweep (or a follower) that has not landed a step yet
        where = getattr(study, "path", "the study")
        raise CircuitsError(f"{where}: no step has landed yet (no complete shard in its shards/ folder); "
                            "run the sweep, or wait for the follower to visit the first checkpoint")
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
    if "progress/key_share" not in curves:  # stored per step only when the sweep was given the keys
        share = key_share_from_study(study)
        if share is not None:
            curves["progress/key_share"] = share
    heads = {key.split("/", 1)[1]: np.asarray(study.array(key), dtype=float) for key in _keys(study, "heads")}
    if _has(study, "llc/llc_mean"):  # a progress measure like any other (phases, leading indicators)
        curves["llc"] = np.asarray(study.array("llc/llc_mean"), dtype=float)

    explained = explained_of(study, gap_z, reproducible, gap_floor)

    circuit = None
    epochs: list[Epoch] = []
    contributions: dict[str, np.ndarray] = {}  # the final stable circuit's edges: share of the gap (NaN without a circuit)
    if _has(study, "circuit/in_circuit"):
        forward_names, backward_names = _graph_names(study)
        stable = _has(study, "circuit/stable")
        masks = np.asarray(study.array("circuit/stable" if stable else "circuit/in_circuit"), dtype=bool)
        faith_key = "circuit/stable_faithfulness" if stable else "circuit/faithfulness"
        faith = np.asarray(study.array(faith_key), dtype=float) if _has(study, faith_key) else None
        if explained is not None:
            masks = masks & explained.has_circuit[:, None, None]
            if faith is not None:
                faith = np.where(explained.has_circuit, faith, np.nan)
        gap = None if explained is None else np.where(explained.has_circuit, explained.gap, np.nan)
        scores = np.asarray(study.array("circuit/scores"), dtype=float)
        node_effects = np.asarray(study.array("circuit/node_effects"), dtype=float) \
            if _has(study, "circuit/node_effects") else None
        circuit = circuit_series(steps, scores, masks, forward_names, backward_names, faith, gap, node_effects)
        if gap is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                shares = scores / gap[:, None, None]
            edge_names = [edge_name(w, r) for w in forward_names for r in backward_names]
            epochs = mechanism_epochs(shares.reshape(len(steps), -1), masks.reshape(len(steps), -1), steps,
                                      edge_names)
            final = circuit.in_circuit[-1]
            for r, c in zip(*np.nonzero(final), strict=True):
                edge = edge_name(forward_names[r], backward_names[c])
                contributions[f"circuit/share/{edge}"] = np.where(masks.any((1, 2)), shares[:, r, c], np.nan)
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
    tracking = Tracking(
        run=getattr(manifest, "name", "") or "",
        steps=steps, curves=curves, heads=heads, circuit=circuit, phases=phases,
        stability=stability_after(circuit, steps, formed), explained=explained, epochs=epochs,
        edge_shares={k.removeprefix("circuit/share/"): v for k, v in contributions.items()},
        llc_stages=llc_stages(study),
    )
    if circuit is not None and hasattr(study, "provenance"):
        # Read here, not in circuits.discovery: its package loads torch, which summary otherwise needs not.
        from circuits.discovery.trust import trust_from_study, trust_settings, trust_text

        tracking.trust = trust_from_study(study)
        tracking.trust_lines = trust_text(tracking.trust, **trust_settings(study))
    candidates = dict(curves)
    for role in tracking.roles():
        node = parse_node(role.head)
        candidates[f"heads/{role.kind}/{role.head}"] = heads[role.kind][:, node.layer, node.head]
    candidates.update(contributions)
    tokens = _tokens_seen(study, len(steps))
    for target in LEAD_TARGETS:
        if target in candidates:
            tracking.leading += leading_indicators(target, phases, candidates, steps, tokens, min_share=min_share)
    return tracking


def key_share_from_study(study) -> np.ndarray | None:
    """``progress/key_share`` over steps, from the study alone: each step's share of squared
    ``progress/embed_freq_norm`` in the run's key frequencies (``progress/key_freqs``, known
    once the run has ended: circuits.run_end); None while they are not."""
    if not (_has(study, "progress/embed_freq_norm") and _has(study, "progress/key_freqs")):
        return None
    squared = np.asarray(study.array("progress/embed_freq_norm"), dtype=float) ** 2  # [steps, (p-1)/2]
    keys = np.asarray(study.array("progress/key_freqs"), dtype=np.int64)[-1]  # one set for the run, 1-based
    return squared[:, keys - 1].sum(axis=1) / np.maximum(squared.sum(axis=1), 1e-30)


LEAD_TARGETS = ("metric", "progress/test_loss", "llc")  # the curves whose phase changes get leading indicators


def _near(window: tuple[int, int], step: int, steps: np.ndarray) -> bool:
    """``step`` within ``window`` widened by one checkpoint each side (the checkpoints' resolution)."""
    i, j = int(np.searchsorted(steps, window[0])), int(np.searchsorted(steps, window[1]))
    lo, hi = int(steps[max(i - 1, 0)]), int(steps[min(j + 1, len(steps) - 1)])
    return lo <= step <= hi


def llc_against_epochs(tracking: Tracking) -> list[dict[str, Any]]:
    """Per LLC stage boundary: the circuit epochs that begin, and the metric / loss phase changes
    whose window overlaps, within its window widened by one checkpoint each side."""
    if tracking.llc_stages is None:
        return []
    steps = np.asarray(tracking.steps)
    starts = [e.start for e in tracking.epochs[1:]]  # an epoch boundary: where a new epoch begins
    out = []
    for b in tracking.llc_stages.boundaries:
        window = (b.window_start, b.window_end)
        epochs = [s for s in starts if _near(window, s, steps)]
        phases = [f"{p.curve} {p.direction} {p.start_step}-{p.end_step}" for p in tracking.phases
                  if p.curve in ("metric", "loss") and _near(window, p.start_step, steps) or
                  p.curve in ("metric", "loss") and p.start_step <= b.step <= p.end_step]
        nearest = min(starts, key=lambda s: abs(s - b.step), default=None)
        out.append({"step": b.step, "window": list(window), "kind": b.kind, "epoch_starts": epochs,
                    "nearest_epoch_start": nearest, "phases": phases})
    return out


def _tokens_seen(study, n: int) -> np.ndarray | None:
    """Tokens seen at each step, or None when the study does not record them."""
    tokens = getattr(study, "tokens_seen", None)
    if tokens is None:
        return None
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens if tokens.shape == (n,) and (tokens >= 0).any() else None


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


def _circuit_edges_of(c: CircuitSeries, head: str) -> str:
    """'; reads k from a0.h2 @425, ...; feeds a1.h1<k> @425, ...' from the stable circuit's emergence."""
    reads, feeds = [], []
    for edge, step in c.edge_emergence_order():
        writer, reader = edge.split("->")
        port = parse_node(reader)
        if port.node == head and port.port in ("q", "k"):
            reads.append(f"{port.port} from {writer} @{step}")
        if writer == head and port.port in ("q", "k"):
            feeds.append(f"{reader} @{step}")
    parts = ([f"reads {', '.join(reads)}"] if reads else []) + ([f"feeds {', '.join(feeds)}"] if feeds else [])
    return "; " + "; ".join(parts) if parts else ""


def _explained_lines(tracking: Tracking) -> list[str]:
    """When there is something to explain, and how reproducible its circuit is."""
    e = tracking.explained
    if e is None:
        return []
    steps = tracking.steps

    # Without a circuit search (--method none) there is an effect to explain, but no circuit to speak of.
    what = "circuit" if tracking.circuit is not None else "effect"
    lines = ["", f"something to explain (a{'' if what == 'circuit' else 'n'} {what} where |z| >= {e.gap_z:g}"
             + (f" and the resamples' mean Jaccard >= {e.reproducible:g}" if np.isfinite(e.reproducibility).any()
                else "") + (f" and the gap >= {e.gap_floor:.0%} of the largest" if e.gap_floor else "") + "):"]
    for a, stop, has in runs_of(e.has_circuit):
        if has:
            continue
        b = stop - 1
        strongest = a + int(np.nanargmax(np.abs(e.z[a : b + 1])))
        span = f"step {int(steps[a])}" if a == b else f"steps {int(steps[a])}-{int(steps[b])}"
        lines.append(f"  no {what} yet at {span}; strongest at step {int(steps[strongest])}: {e.gap_text(strongest)}")
    with_circuit = np.nonzero(e.has_circuit)[0]
    if len(with_circuit):
        first, last = int(with_circuit[0]), len(steps) - 1
        lines.append(f"  first {what} at step {int(steps[first])}: {e.gap_text(first)}")
        lines.append(f"  last step {int(steps[last])}: {e.gap_text(last)}")
    return lines


def _edges_text(edges: list[dict[str, Any]], most: int = 4) -> str:
    """'19 (12 <k>, 7 <v>): a->b (+0.13), ... and 15 more': counts by the port read, strongest first."""
    ports: dict[str, int] = {}
    for e in edges:
        port = parse_node(parse_edge(e["edge"])[1]).port
        key = f"<{port}>" if port else "direct"
        ports[key] = ports.get(key, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(ports.items(), key=lambda kv: (-kv[1], kv[0])))
    shown = ", ".join(f"{e['edge']} ({e['mean_share']:+.2f})" for e in edges[:most])
    return f"{len(edges)} ({kinds}): {shown}" + (f" and {len(edges) - most} more" if len(edges) > most else "")


def _epoch_lines(tracking: Tracking) -> list[str]:
    """'epochs of the mechanism: ...', one line per epoch with what sets it apart from the one before."""
    if not tracking.epochs:
        return []
    lines = ["", f"epochs of the mechanism (every step's stable circuit within weighted Jaccard {EPOCH_SIMILARITY:g} "
             "of its epoch's mean; edges by mean share of the gap):"]
    for e in tracking.epochs:
        span = f"step {e.start}" if e.start == e.end else f"steps {e.start}-{e.end}"
        if not e.has_circuit:
            lines.append(f"  {span}: no circuit yet" if e is tracking.epochs[0] else f"  {span}: no circuit")
            continue
        line = f"  {span}: {e.n_edges} edges (similarity >= {e.similarity:.2f})"
        if e.added:
            line += f"; adds {_edges_text(e.added)}"
        if e.dropped:
            line += f"; drops {_edges_text(e.dropped)}"
        lines.append(line)
    return lines


def _leading_lines(tracking: Tracking, most: int = 8) -> list[str]:
    """Per phase change of the metric (or test loss): the measures whose own change started earlier."""
    if not tracking.leading:
        return []
    lines = ["", f"leading indicators (own change started = first step from which it stays {LEAD_MOVE:.0%} of the "
             "way toward where it is at the end of the target's change; done = within 10% of it):"]
    for x in tracking.leading:
        lines.append(f"  {x.target} {x.direction} at step {x.step} (window {x.start_step}-{x.end_step}, "
                     f"starts {x.onset}): " + ("no measure started earlier" if not x.indicators else
                                              f"{len(x.indicators)} measures started earlier"))
        for ind in x.indicators[:most]:
            tokens = "" if ind["lead_tokens"] is None else f", {ind['lead_tokens']:,} tokens"
            done = "still moving" if ind["still_moving"] else f"done by {ind['done']}"
            lines.append(f"    {ind['measure']} from {ind['onset']}, {done} (lead {ind['lead_steps']} steps{tokens})")
        if len(x.indicators) > most:
            lines.append(f"    and {len(x.indicators) - most} more (--json)")
    return lines


def _llc_lines(tracking: Tracking) -> list[str]:
    """'LLC stages: ...' one line per stage boundary, then where they fall against the circuit epochs."""
    st = tracking.llc_stages
    if st is None:
        return []
    steps = tracking.steps
    lines = ["", f"LLC stages (piecewise-linear fit; plateau = moves < {st.settings.get('z', 2):g} sigma; window = "
             f"where the boundary fits within chi2 + {st.settings.get('window_chi2', 1):g}; circuits.stages):"]
    lines.append("  " + ", ".join(f"{s.kind} {s.start_step}-{s.end_step} ({s.start_value:.3g} -> {s.end_value:.3g})"
                                  for s in st.stages) if st.stages else "  none (too few steps)")
    if st.stages and not st.boundaries:
        lines.append("  no stage boundary: the curve is one stage")
    compared = {c["step"]: c for c in llc_against_epochs(tracking)}
    have_epochs = len(tracking.epochs) > 1
    for b in st.boundaries:
        c = compared[b.step]
        line = (f"  boundary at step {b.step} ({b.kind}: {b.before} -> {b.after}), window {b.window_start}-"
                f"{b.window_end}, LLC {b.value:.3g} +- {b.se:.2g}")
        if have_epochs:
            line += ("; coincides with the circuit epoch starting at " + ", ".join(map(str, c["epoch_starts"]))
                     if c["epoch_starts"] else f"; no circuit epoch starts there (nearest: "
                     f"{c['nearest_epoch_start']}, {abs(int(c['nearest_epoch_start']) - b.step)} steps away)")
        if c["phases"]:
            line += f"; inside or at the phase change {', '.join(c['phases'])}"
        lines.append(line)
    if not have_epochs and st.boundaries:
        lines.append("  (no circuit epochs to compare with: sweep with --method eap-ig for them)")
    if have_epochs:
        lone = [e.start for e in tracking.epochs[1:]
                if not any(_near((b.window_start, b.window_end), e.start, np.asarray(steps)) for b in st.boundaries)]
        if lone:
            lines.append(f"  circuit epochs starting with no LLC boundary near: {', '.join(map(str, lone))}")
    return lines


def summary_text(tracking: Tracking) -> str:
    """The report ``circuits summary`` prints: phases, emergence order, stability."""
    steps = tracking.steps
    lines = [f"run {tracking.run or '?'}: {len(steps)} steps from {int(steps[0])} to {int(steps[-1])}"]
    ends = ", ".join(f"{k} {_fmt(float(v[0]))} -> {_fmt(float(v[-1]))}" for k, v in tracking.curves.items()
                     if k in ("metric", "loss", "progress/icl_score", "progress/test_acc", "circuit/n_edges", "llc"))
    if ends:
        lines.append(f"  {ends}")
    if "progress/top_share" in tracking.curves and "progress/restricted_loss" not in tracking.curves:
        # modular addition: these need the run's final checkpoint (circuits.run_end)
        lines.append("  restricted loss, excluded loss and key share are computed when the run ends "
                     "(`circuits finalize STUDY`)")
    lines += _explained_lines(tracking)
    if tracking.trust_lines:
        lines += ["", *tracking.trust_lines]
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
    lines.append(f"head roles (score rising >= {ROLE_FLOOR} above step 0 and >= half the strongest head's rise; "
                 "formed = first step past half-way for good):")
    roles = tracking.roles()
    if tracking.heads and not roles:
        lines.append("  none: every detector stays flat")
    for role in roles:
        line = (f"  {role.head} {role.kind}: {_fmt(role.start)} -> {_fmt(role.end)}, formed at step "
                f"{_fmt(role.formed)} (after {_fmt(role.after_step)})")
        if tracking.circuit is not None:
            line += _circuit_edges_of(tracking.circuit, role.head)
        lines.append(line)
    lines += _epoch_lines(tracking) + _llc_lines(tracking) + _leading_lines(tracking)
    c = tracking.circuit
    if c is not None:
        lines.append("")
        lines.append("emergence of the final stable circuit's edges (step from which each stays, at steps with a "
                     "circuit; after = the checkpoint before):")
        edges = c.edge_emergence_order()
        lines += [f"  {e} @{s} (after {_fmt(_step_before(steps, s))})" for e, s in edges] or ["  (none)"]
        lines.append("nodes (in when any of its edges is; " + (
            "emerging when its ablation effect's share of the gap stays material):" if c.node_shares is not None
            else "emerging with its first edge):"))
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
