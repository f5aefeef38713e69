"""Pure data for the circuit view: a layered layout with q/k/v ports, edges routed around nodes,
the key-edges view of big graphs, and step-to-step diffs.

No Streamlit here: the pages call these functions and hand the result (plain JSON-ready dicts)
to the graph component, so all of it is unit-tested with numpy arrays.

The graph is EAP-IG's dense form: ``scores[writer, reader_port]`` over the study's
``forward_names`` (``input``, ``a{l}.h{h}``, ``m{l}``) and ``backward_names`` (``a{l}.h{h}<q>``,
``<k>``, ``<v>``, ``m{l}``, ``logits``). Nodes sit in fixed rows, so the same head is in the
same place at every step and change is visible: the input at the bottom, then for each layer
a row of heads and its MLP above it, the logits on top. The layout fills the width and height
it is given (the page's drawing area), so the whole graph is on screen.

Geometry (pixels, y down): every node is a box; an edge leaves its writer at the top centre
and ends at its reader's entry point on the bottom edge (a head has three: q left, k middle,
v right). An edge that skips rows is routed through the gaps of every row it crosses: it
crosses each row's band vertically, at least ``CLEAR`` from any box, so that the component may
round its corners by up to ``CLEAR`` without touching a node.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Float

from circuits import graph

from .formation import EdgeStats

# Colour says what an edge does to the task (docs/discovery.md: patching an edge the task needs
# lowers the metric, so its score is negative). Blue/orange is a colour-blind safe pair.
NEEDED = "#2166ac"  # score < 0: the task needs the edge
OPPOSING = "#e08214"  # score > 0: the edge works against the task
ADDED = "#1a9850"  # halo of an edge added since the previous step
REMOVED = "#9e9e9e"  # dashed: in the previous step's selection, not in this one
BUNDLE = "#8c8c8c"
PORTS = ("q", "k", "v")
PORT_OFFSET = {"q": -1.0, "k": 0.0, "v": 1.0, "": 0.0}  # entry point across a head's box, -1 left .. 1 right

STORED = ("circuit", "full")  # selections read from the study: the stable circuit, the full-data circuit
KEY_EDGES = 60  # edges a person can read one by one: the key-edges view draws this many
DRAW_LIMIT = 300  # a selection larger than this is drawn as its KEY_EDGES strongest plus bundles

WIDTH = 1000.0  # default drawing area (pixels); the page passes its own
HEIGHT = 560.0
MARGIN_X = 24.0
MARGIN_Y = 16.0
GUTTER = 90.0  # free strip on the right where bundles of aggregated edges run
CLEAR = 7.0  # least distance of a routed edge from any box it passes
BAND = 2.0  # a route crosses a row from BAND below its boxes to BAND above them
ROLE_BADGES = {"induction": "IND", "previous_token": "PREV", "duplicate_token": "DUP",
               "successor": "SUCC", "copy_suppression": "CS", "copying": "COPY"}


class Parsed(NamedTuple):
    name: str  # the node, port stripped
    kind: str
    layer: int | None
    head: int | None
    port: str


@functools.lru_cache(maxsize=4096)
def parse_node(name: str) -> Parsed:
    """Split a writer or reader-port name (format owned by ``circuits.graph``) for drawing."""
    node = graph.parse_node(name)
    return Parsed(node.node, node.kind, node.layer, node.head, node.port or "")


@dataclass(frozen=True)
class Node:
    """One drawn node: ``kind`` is input | head | mlp | logits; a box centred on (x, y), w x h pixels."""

    name: str
    kind: str
    layer: int
    head: int
    x: float
    y: float
    w: float
    h: float
    row: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom)."""
        return (self.x - self.w / 2, self.y - self.h / 2, self.x + self.w / 2, self.y + self.h / 2)

    def entry(self, port: str = "") -> tuple[float, float]:
        """Where an edge into ``port`` (q, k, v, or "" for an MLP or the logits) ends: the box's bottom edge."""
        return (self.x + PORT_OFFSET.get(port, 0.0) * self.w / 3, self.y + self.h / 2)

    @property
    def exit(self) -> tuple[float, float]:
        """Where this node's outgoing edges start: the top centre."""
        return (self.x, self.y - self.h / 2)


@dataclass(frozen=True)
class Layout:
    """Fixed positions of every node of a model's graph in a width x height drawing area.

    ``rows[r]`` names the nodes of row r (0 is the input, at the bottom); ``row_y[r]`` is its
    centre line; ``box_h`` the height of every box."""

    nodes: dict[str, Node]
    width: float
    height: float
    rows: tuple[tuple[str, ...], ...]
    row_y: tuple[float, ...]
    box_h: float

    @property
    def gutter_x(self) -> float:
        """Left edge of the strip where bundles run (no node lies right of it)."""
        return self.width - GUTTER

    @functools.cached_property
    def free(self) -> tuple[tuple[tuple[float, float], ...], ...]:
        """Per row, the x intervals where a route may cross it (at least CLEAR from every box)."""
        out = []
        lo, hi = MARGIN_X / 2, self.gutter_x
        for names in self.rows:
            blocked = sorted((self.nodes[n].box[0] - CLEAR, self.nodes[n].box[2] + CLEAR) for n in names)
            free: list[tuple[float, float]] = []
            start = lo
            for left, right in blocked:
                if left > start:
                    free.append((start, left))
                start = max(start, right)
            if start < hi:
                free.append((start, hi))
            out.append(tuple(free))
        return tuple(out)

    @functools.cached_property
    def routes(self) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
        """Memo of ``route`` (the layout is fixed, so is every edge's path; to 0.1 px): filled as edges are drawn."""
        return {}


@functools.lru_cache(maxsize=32)
def cached_layout(forward_names: tuple[str, ...], backward_names: tuple[str, ...], width: float = WIDTH,
                  height: float = HEIGHT) -> Layout:
    """``layout`` once per graph and drawing area (a Layout is frozen: safe to share)."""
    return layout(list(forward_names), list(backward_names), width, height)


def layout(forward_names: list[str], backward_names: list[str], width: float = WIDTH,
           height: float = HEIGHT) -> Layout:
    """Rows from the bottom: input, for each layer its heads then its MLP, logits; heads in columns."""
    parsed: dict[str, Parsed] = {}
    for name in [*forward_names, *backward_names]:
        node = parse_node(name)
        parsed.setdefault(node.name, node)
    n_layers = 1 + max((p.layer for p in parsed.values() if p.layer is not None), default=-1)
    n_heads = 1 + max((p.head for p in parsed.values() if p.head is not None), default=0)
    has_mlp = any(p.kind == "mlp" for p in parsed.values())
    per_layer = 2 if has_mlp else 1

    def row_of(p: Parsed) -> int:
        if p.kind == "input":
            return 0
        if p.kind == "logits":
            return 1 + n_layers * per_layer
        assert p.layer is not None  # heads and MLPs have a layer
        return 1 + p.layer * per_layer + (1 if p.kind == "mlp" else 0)

    n_rows = 2 + n_layers * per_layer
    spacing = (height - 2 * MARGIN_Y) / max(n_rows - 1, 1)
    box_h = float(np.clip(0.5 * spacing, 10.0, 26.0))
    span_left, span_right = MARGIN_X, width - GUTTER
    column = (span_right - span_left) / n_heads
    head_w = float(np.clip(column - 2 * CLEAR - 6, 14.0, 72.0))
    centre = (span_left + span_right) / 2
    wide_w = float(min(80.0, span_right - span_left - 4 * CLEAR))
    row_y = tuple(float(height - MARGIN_Y - r * spacing) for r in range(n_rows))
    nodes = {}
    rows: list[list[str]] = [[] for _ in range(n_rows)]
    for name, p in parsed.items():
        r = row_of(p)
        if p.kind == "head":
            assert p.head is not None
            x, w = span_left + (p.head + 0.5) * column, head_w
        else:
            x, w = centre, wide_w
        layer = -1 if p.kind == "input" else n_layers if p.kind == "logits" else int(p.layer or 0)
        head = -1 if p.head is None else p.head
        nodes[name] = Node(name, p.kind, layer, head, float(x), row_y[r], w, box_h, r)
        rows[r].append(name)
    ordered = tuple(tuple(sorted(names, key=lambda n: nodes[n].x)) for names in rows)
    return Layout(nodes, float(width), float(height), ordered, row_y, box_h)


# ---------------------------------------------------------------- routing


def _free_x(graph_layout: Layout, row: int, wanted: float) -> float:
    """The x nearest ``wanted`` at which a route crosses ``row`` at least CLEAR from every box."""
    best, best_d = wanted, float("inf")
    for left, right in graph_layout.free[row]:
        x = min(max(wanted, left), right)
        if abs(x - wanted) < best_d:
            best, best_d = x, abs(x - wanted)
    return best


def route(graph_layout: Layout, writer: str, reader: str, port: str = "") -> list[tuple[float, float]]:
    """The polyline of the edge ``writer -> reader<port>``: from the writer's top to the reader's
    entry point, crossing each row in between vertically through a gap (slanted only between
    rows, where there are no boxes)."""
    key = (writer, reader, port)
    if key not in graph_layout.routes:
        graph_layout.routes[key] = [(round(x, 1), round(y, 1)) for x, y in _route(graph_layout, writer, reader, port)]
    return graph_layout.routes[key]


def _route(graph_layout: Layout, writer: str, reader: str, port: str) -> list[tuple[float, float]]:
    src, dst = graph_layout.nodes[writer], graph_layout.nodes[reader]
    start, end = src.exit, dst.entry(port)
    half = graph_layout.box_h / 2 + BAND
    # leave and enter vertically, so that every slanted segment lies between two rows' bands
    points = [start, (start[0], start[1] - BAND)]
    for row in range(src.row + 1, dst.row):
        y = graph_layout.row_y[row]
        x0, y0 = points[-1]
        # where the line from the last point to the end would cross this row
        wanted = x0 + (end[0] - x0) * (y0 - y) / (y0 - end[1]) if y0 != end[1] else x0
        x = _free_x(graph_layout, row, wanted)
        points += [(x, y + half), (x, y - half)]
    points += [(end[0], end[1] + BAND), end]
    return points


def _layer_group(name: str) -> str:
    """The layer a node belongs to for bundling: ``input``, ``layer {l}`` or ``logits``."""
    p = parse_node(name)
    return p.kind if p.kind in ("input", "logits") else f"layer {p.layer}"


@functools.lru_cache(maxsize=16)
def _groups(names: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """(the distinct layer groups in order of first appearance, each name's index into them)."""
    labels = [_layer_group(n) for n in names]
    order = list(dict.fromkeys(labels))
    return tuple(order), np.array([order.index(g) for g in labels], dtype=np.int64)


def bundles(graph_layout: Layout, forward_names: list[str], backward_names: list[str],
            scores: Float[np.ndarray, "n_forward n_backward"],
            rest: Bool[np.ndarray, "n_forward n_backward"]) -> list[dict]:
    """The edges of ``rest`` aggregated by (writer layer, reader layer): one bundle per pair with
    its edge count and summed |score|, drawn in the right-hand gutter from the writer layer's
    row to the reader layer's (width by summed |score| relative to the largest bundle)."""
    rows, cols = np.nonzero(np.asarray(rest, dtype=bool) & np.isfinite(scores))
    if rows.size == 0:
        return []
    w_names, w_group = _groups(tuple(forward_names))
    r_names, r_group = _groups(tuple(backward_names))
    pair = w_group[rows] * len(r_names) + r_group[cols]
    count = np.bincount(pair, minlength=len(w_names) * len(r_names))
    total = np.bincount(pair, weights=np.abs(scores[rows, cols]).astype(np.float64),
                        minlength=len(w_names) * len(r_names))
    present = np.nonzero(count)[0]
    largest = float(total[present].max()) or 1.0
    anchors = _group_rows(graph_layout)
    spans = {int(k): abs(anchors[r_names[k % len(r_names)]][0] - anchors[w_names[k // len(r_names)]][1])
             for k in present}
    widest = max(spans.values()) or 1
    out = []
    gx = graph_layout.gutter_x + 8
    for k in present.tolist():
        w, r = w_names[k // len(r_names)], r_names[k % len(r_names)]
        top_row, bottom_row = anchors[w][1], anchors[r][0]
        if w == r:  # a layer's heads into its own MLP: from the heads' row up to the MLP's
            top_row, bottom_row = anchors[w][0], anchors[w][1]
        y1, y2 = graph_layout.row_y[top_row], graph_layout.row_y[bottom_row]
        bulge = 6 + (GUTTER - 20) * spans[k] / widest
        out.append({
            "id": f"{w}->{r}", "src": w, "dst": r, "count": int(count[k]), "sum": round(float(total[k]), 6),
            "width": round(1.0 + 7.0 * float(total[k]) / largest, 2),
            "points": [[gx, y1], [gx + bulge, y1], [gx + bulge, y2], [gx, y2]],
        })
    return out


def _group_rows(graph_layout: Layout) -> dict[str, tuple[int, int]]:
    """(lowest row, highest row) of each layer group's nodes."""
    out: dict[str, tuple[int, int]] = {}
    for node in graph_layout.nodes.values():
        g = _layer_group(node.name)
        lo, hi = out.get(g, (node.row, node.row))
        out[g] = (min(lo, node.row), max(hi, node.row))
    return out


# ---------------------------------------------------------------- selection


def _magnitude(scores: np.ndarray) -> np.ndarray:
    return np.abs(np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0))


def strongest(scores: Float[np.ndarray, "n_forward n_backward"], among: Bool[np.ndarray, "n_forward n_backward"],
              n: int) -> Bool[np.ndarray, "n_forward n_backward"]:
    """The ``n`` edges of ``among`` of largest |score| (ties broken by position, so it is deterministic)."""
    flat = np.where(np.asarray(among, dtype=bool) & np.isfinite(scores), _magnitude(scores), -1.0).ravel()
    n = int(min(max(n, 0), int((flat > 0).sum())))
    mask = np.zeros(flat.shape, dtype=bool)
    if n:
        # the n-th largest |score|, then every edge above it and the first ones (by position) equal to it
        cut = -np.partition(-flat, n - 1)[n - 1]
        above = np.flatnonzero(flat > cut)
        ties = np.flatnonzero(flat == cut)[: n - above.size]
        mask[above] = True
        mask[ties] = True
    return mask.reshape(np.shape(scores))


def select_edges(
    scores: Float[np.ndarray, "n_forward n_backward"],
    in_circuit: Bool[np.ndarray, "n_forward n_backward"] | None,
    mode: str = "circuit",
    threshold: float = 0.0,
    top_n: int = 50,
) -> Bool[np.ndarray, "n_forward n_backward"]:
    """Which edges to draw: a stored circuit (``circuit``: the stable circuit, ``full``: the
    full-data one; ``in_circuit`` is that mask), |score| >= threshold, the top-n by |score|, or
    ``key``: the KEY_EDGES strongest of all (the view bundles the rest by layer pair).

    Non-finite scores (edges that cannot exist, written as NaN) are never selected.
    """
    finite = np.isfinite(scores)
    if mode in STORED:
        if in_circuit is None:
            raise ValueError(f"mode {mode!r} needs the stored circuit's mask")
        return np.asarray(in_circuit, dtype=bool) & finite
    if mode == "threshold":
        magnitude = _magnitude(scores)
        return finite & (magnitude >= threshold) & (magnitude > 0)
    if mode == "top-n":
        return strongest(scores, finite, top_n)
    if mode == "key":
        return strongest(scores, finite, KEY_EDGES)
    raise ValueError(f"unknown edge selection {mode!r}; expected circuit, full, threshold, top-n or key")


def diff(
    previous: Bool[np.ndarray, "n_forward n_backward"] | None,
    current: Bool[np.ndarray, "n_forward n_backward"],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept, added, removed) masks between the previous step's edges and this step's."""
    current = np.asarray(current, dtype=bool)
    if previous is None:
        return current, np.zeros_like(current), np.zeros_like(current)
    previous = np.asarray(previous, dtype=bool)
    return current & previous, current & ~previous, previous & ~current


def jaccard_matrix(masks: Bool[np.ndarray, "n_steps n_forward n_backward"]) -> Float[np.ndarray, "n_steps n_steps"]:
    """Step x step Jaccard similarity of edge sets (vectorised over all pairs)."""
    flat = np.asarray(masks, dtype=bool).reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    sizes = flat.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return out.astype(np.float64)


# ---------------------------------------------------------------- the view


def view(
    graph_layout: Layout,
    forward_names: list[str],
    backward_names: list[str],
    scores: Float[np.ndarray, "n_forward n_backward"],
    current: Bool[np.ndarray, "n_forward n_backward"],
    previous: Bool[np.ndarray, "n_forward n_backward"] | None = None,
    previous_scores: Float[np.ndarray, "n_forward n_backward"] | None = None,
    selected: str | None = None,
    stats: EdgeStats | None = None,
    previous_stats: EdgeStats | None = None,
    rest: Bool[np.ndarray, "n_forward n_backward"] | None = None,
    roles: dict[str, list[str]] | None = None,
    opacity_by_inclusion: bool = False,
    limit: int = DRAW_LIMIT,
) -> dict:
    """The JSON the graph component draws: nodes (fixed boxes, ports, role badges), routed
    edges with style, and bundles of the edges not drawn one by one.

    Edge ``status`` is ``kept``, ``added`` (not in the previous step's selection) or ``removed``
    (in the previous step's, not in this one; drawn with the previous score). Width grows with
    |score| relative to the largest drawn; colour says needed (score < 0) or opposing (> 0).
    With ``stats`` (the step's bootstrap) each edge also carries its ``inclusion`` (share of
    resamples holding it) and ``se`` (its score's standard error), None without; a removed edge
    the previous step's. With ``opacity_by_inclusion`` (the stable circuit) an edge's opacity is
    its inclusion. ``counts`` are over the whole selections.

    A selection of more than ``limit`` edges is drawn as its KEY_EDGES strongest (removed edges:
    those among the previous step's strongest); the others join ``rest``, which is drawn as one
    bundle per layer pair (``bundles``). ``roles`` maps a head to its detector roles (badges).
    """
    current = np.asarray(current, dtype=bool)
    kept_all, added_all, removed_all = diff(previous, current)
    counts = {s: int(m.sum()) for s, m in (("kept", kept_all), ("added", added_all), ("removed", removed_all))}
    before = scores if previous_scores is None else previous_scores
    capped = rest is not None or int(current.sum()) > limit
    bundled = np.zeros_like(current) if rest is None else np.asarray(rest, dtype=bool)
    if int(current.sum()) > limit:
        drawn = strongest(scores, current, KEY_EDGES)
        bundled = bundled | (current & ~drawn)
        drawn_prev = None if previous is None else strongest(before, previous, KEY_EDGES)
    else:
        drawn, drawn_prev = current, previous
    kept, added, _ = diff(previous, drawn)
    removed = np.zeros_like(drawn) if drawn_prev is None else np.asarray(drawn_prev, dtype=bool) & ~current

    parts = (("kept", kept, scores, stats), ("added", added, scores, stats), ("removed", removed, before, previous_stats))
    largest = max((float(_magnitude(source[mask]).max()) for _, mask, source, _ in parts if mask.any()), default=0.0)
    largest = largest or 1.0
    # the widest edge is a third of a box's height (5.25 px at most): thin lines where rows are tight
    widest = float(np.clip(graph_layout.box_h / 3, 1.5, 5.25))
    active: set[str] = set()
    out_edges = []
    for status, mask, source, edge_stats in parts:
        rows, cols = np.nonzero(mask)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            value = float(source[r, c])
            value = value if np.isfinite(value) else 0.0
            writer, reader = forward_names[r], parse_node(backward_names[c])
            if status != "removed":
                active.update((writer, reader.name))
            inclusion = _at(None if edge_stats is None else edge_stats.inclusion, r, c, 3)
            opacity = max(0.15, inclusion) if opacity_by_inclusion and inclusion is not None else 0.9
            out_edges.append({
                "id": f"{writer}->{backward_names[c]}",
                "src": writer,
                "dst": reader.name,
                "port": reader.port,
                "score": round(value, 6),
                "width": round(0.6 + widest * abs(value) / largest, 2),
                "color": NEEDED if value < 0 else OPPOSING,
                "opacity": round(opacity, 3),
                "status": status,
                "inclusion": inclusion,
                "se": _at(None if edge_stats is None else edge_stats.score_se, r, c, 6),
                "points": route(graph_layout, writer, reader.name, reader.port),
            })
    nodes = _node_json(graph_layout, active, roles or {}, selected)
    bundle_list = bundles(graph_layout, forward_names, backward_names, scores, bundled) if capped else []
    return {"width": graph_layout.width, "height": graph_layout.height, "nodes": nodes, "edges": out_edges,
            "bundles": bundle_list, "counts": counts, "selected": selected,
            "note": bundle_note(int(drawn.sum()), bundle_list) if capped else None,
            "opacity_note": "opacity: share of bootstrap resamples holding the edge" if opacity_by_inclusion else None}


def _node_json(graph_layout: Layout, active: set[str], roles: dict[str, list[str]], selected: str | None) -> list[dict]:
    """Every node's box, its q/k/v entry points (heads), role badges, and whether an edge touches it."""
    return [
        {
            "id": n.name, "kind": n.kind, "x": n.x, "y": n.y, "w": n.w, "h": n.h,
            "label": label(n.name),
            "ports": [[p, *n.entry(p)] for p in PORTS] if n.kind == "head" else [],
            "roles": [[role_badge(kind), kind.replace("_", " ")] for kind in roles.get(n.name, [])],
            "active": n.name in active,
            "selected": n.name == selected,
        }
        for n in graph_layout.nodes.values()
    ]


def bundle_note(n_drawn: int, bundle_list: list[dict]) -> str | None:
    """The legend's line on what is drawn one by one and what is aggregated."""
    n_rest = sum(b["count"] for b in bundle_list)
    if not n_rest:
        return None
    return (f"The {n_drawn} strongest edges are drawn one by one; the other {n_rest:,} are bundled by layer pair "
            f"into {len(bundle_list)} grey arcs on the right (width: summed |score|; each names its count and sum).")


def label(name: str) -> str:
    """What a node is called in the graph: the same name as everywhere else (``a1.h1``, ``m0``)."""
    return parse_node(name).name


def role_badge(kind: str) -> str:
    """A detector role's short badge (``induction`` -> ``IND``)."""
    return ROLE_BADGES.get(kind, kind[:4].upper())


def _at(values: np.ndarray | None, r: int, c: int, digits: int) -> float | None:
    if values is None or not np.isfinite(values[r, c]):
        return None
    return round(float(values[r, c]), digits)


def touching(forward_names: list[str], backward_names: list[str], node: str) -> Bool[np.ndarray, "n_forward n_backward"]:
    """The edges into or out of ``node`` (any of its ports)."""
    out_of = np.array([n == node for n in forward_names])
    into = np.array([parse_node(n).name == node for n in backward_names])
    return out_of[:, None] | into[None, :]


def edge_rows(
    forward_names: list[str],
    backward_names: list[str],
    scores: Float[np.ndarray, "n_forward n_backward"],
    drawn: Bool[np.ndarray, "n_forward n_backward"],
    stats: EdgeStats,
    circuits: dict[str, np.ndarray],
) -> list[dict]:
    """One row per drawn edge, strongest first: score, its standard error, the share of resamples
    holding it, and whether each named circuit (``{"stable circuit": mask, ...}``) holds it."""
    rows, cols = np.nonzero(np.asarray(drawn, dtype=bool))
    order = np.argsort(-np.abs(np.nan_to_num(scores[rows, cols])), kind="stable")
    out = []
    for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        out.append({"edge": f"{forward_names[r]}->{backward_names[c]}", "score": float(scores[r, c]),
                    "+- se": _at(stats.score_se, r, c, 6), "in resamples": _at(stats.inclusion, r, c, 3)}
                   | {name: bool(mask[r, c]) for name, mask in circuits.items()})
    return out
