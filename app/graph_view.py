"""Pure data for the circuit view: fixed node positions, edge selection, and step-to-step diffs.

No Streamlit here: the pages call these functions and hand the result (plain JSON-ready dicts)
to the graph component, so all of it is unit-tested with numpy arrays.

The graph is EAP-IG's dense form: ``scores[writer, reader_port]`` over the study's
``forward_names`` (``input``, ``a{l}.h{h}``, ``m{l}``) and ``backward_names`` (``a{l}.h{h}<q>``,
``<k>``, ``<v>``, ``m{l}``, ``logits``). Nodes sit on a fixed grid, so the same head is in the
same place at every step and change is visible: the input at the bottom, then for each layer
a row of heads and its MLP above it, the logits on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Float

from circuits import graph

from .formation import EdgeStats

# Colours (colour-blind safe pairs): kept edges by sign, added and removed marked apart.
POSITIVE = "#2166ac"
NEGATIVE = "#b2182b"
ADDED = "#1a9850"
REMOVED = "#9e9e9e"
PORT_OFFSET = {"q": -1.0, "k": 0.0, "v": 1.0, "": 0.0}

STORED = ("circuit", "full")  # selections read from the study: the stable circuit, the full-data circuit

X_GAP = 70.0  # pixels between heads in a row
Y_GAP = 60.0  # pixels between rows
MARGIN = 40.0


class Parsed(NamedTuple):
    name: str  # the node, port stripped
    kind: str
    layer: int | None
    head: int | None
    port: str


def parse_node(name: str) -> Parsed:
    """Split a writer or reader-port name (format owned by ``circuits.graph``) for drawing."""
    node = graph.parse_node(name)
    return Parsed(node.node, node.kind, node.layer, node.head, node.port or "")


@dataclass(frozen=True)
class Node:
    """One drawn node: ``kind`` is input | head | mlp | logits; x, y in pixels (y down)."""

    name: str
    kind: str
    layer: int
    head: int
    x: float
    y: float


@dataclass(frozen=True)
class Layout:
    """Fixed positions of every node of a model's graph, and the SVG canvas size."""

    nodes: dict[str, Node]
    width: float
    height: float


def layout(forward_names: list[str], backward_names: list[str]) -> Layout:
    """Positions on a layer x head grid: input at the bottom, per layer heads then MLP, logits on top."""
    parsed = {}
    for name in [*forward_names, *backward_names]:
        node = parse_node(name)
        parsed.setdefault(node.name, node)
    n_layers = 1 + max((p.layer for p in parsed.values() if p.layer is not None), default=-1)
    n_heads = 1 + max((p.head for p in parsed.values() if p.head is not None), default=0)
    width = 2 * MARGIN + max(n_heads - 1, 1) * X_GAP
    n_rows = 2 + 2 * n_layers
    height = 2 * MARGIN + (n_rows - 1) * Y_GAP
    centre = width / 2

    def y_of(row: int) -> float:  # row 0 is the bottom
        return height - MARGIN - row * Y_GAP

    nodes = {}
    for name, p in parsed.items():
        if p.kind == "input":
            x, y, layer, head = centre, y_of(0), -1, -1
        elif p.kind == "logits":
            x, y, layer, head = centre, y_of(n_rows - 1), n_layers, -1
        elif p.kind == "head":
            x, y, layer, head = MARGIN + p.head * X_GAP, y_of(1 + 2 * p.layer), p.layer, p.head
        else:  # mlp
            x, y, layer, head = centre, y_of(2 + 2 * p.layer), p.layer, -1
        nodes[name] = Node(name, p.kind, layer, head, float(x), float(y))
    return Layout(nodes, float(width), float(height))


def select_edges(
    scores: Float[np.ndarray, "n_forward n_backward"],
    in_circuit: Bool[np.ndarray, "n_forward n_backward"] | None,
    mode: str = "circuit",
    threshold: float = 0.0,
    top_n: int = 50,
) -> Bool[np.ndarray, "n_forward n_backward"]:
    """Which edges to draw: a stored circuit (``circuit``: the stable circuit, ``full``: the
    full-data one; ``in_circuit`` is that mask), |score| >= threshold, or the top-n by |score|.

    Non-finite scores (edges that cannot exist, written as NaN) are never selected.
    """
    magnitude = np.abs(np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0))
    finite = np.isfinite(scores)
    if mode in STORED:
        if in_circuit is None:
            raise ValueError(f"mode {mode!r} needs the stored circuit's mask")
        return np.asarray(in_circuit, dtype=bool) & finite
    if mode == "threshold":
        return finite & (magnitude >= threshold) & (magnitude > 0)
    if mode == "top-n":
        flat = np.where(finite, magnitude, -1.0).ravel()
        n = int(min(max(top_n, 0), int((flat > 0).sum())))
        mask = np.zeros(flat.shape, dtype=bool)
        if n:
            mask[np.argpartition(-flat, n - 1)[:n]] = True
        return mask.reshape(scores.shape)
    raise ValueError(f"unknown edge selection {mode!r}; expected circuit, full, threshold or top-n")


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
) -> dict:
    """The JSON the graph component draws: nodes (fixed positions) and edges with style.

    Edge ``status`` is ``kept``, ``added`` (not in the previous step's selection) or ``removed``
    (in the previous step's, not in this one; drawn with the previous score). Width grows with
    |score| relative to the largest drawn; colour is the sign for kept edges. With ``stats``
    (the step's bootstrap) each edge also carries its ``inclusion`` (share of resamples holding
    it) and ``se`` (its score's standard error), None without; a removed edge the previous step's.
    """
    kept, added, removed = diff(previous, current)
    edges = []
    largest = 0.0
    for status, mask, source in (("kept", kept, scores), ("added", added, scores),
                                 ("removed", removed, scores if previous_scores is None else previous_scores)):
        rows, cols = np.nonzero(mask)
        values = np.nan_to_num(source[rows, cols])
        if values.size:
            largest = max(largest, float(np.abs(values).max()))
        edges.append((status, rows, cols, values, previous_stats if status == "removed" else stats))
    largest = largest or 1.0
    active: set[str] = set()
    out_edges = []
    for status, rows, cols, values, edge_stats in edges:
        for r, c, value in zip(rows.tolist(), cols.tolist(), values.tolist(), strict=True):
            writer = forward_names[r]
            reader = parse_node(backward_names[c])
            width = 0.75 + 5.25 * abs(value) / largest
            if status == "kept":
                colour = POSITIVE if value >= 0 else NEGATIVE
            else:
                colour = ADDED if status == "added" else REMOVED
            if status != "removed":
                active.update((writer, reader.name))
            out_edges.append({
                "id": f"{writer}->{backward_names[c]}",
                "src": writer,
                "dst": reader.name,
                "port": reader.port,
                "offset": PORT_OFFSET.get(reader.port, 0.0),
                "score": round(float(value), 6),
                "width": round(width, 2),
                "color": colour,
                "status": status,
                "inclusion": _at(None if edge_stats is None else edge_stats.inclusion, r, c, 3),
                "se": _at(None if edge_stats is None else edge_stats.score_se, r, c, 6),
            })
    nodes = [
        {
            "id": n.name,
            "kind": n.kind,
            "x": n.x,
            "y": n.y,
            "label": _label(n),
            "active": n.name in active,
            "selected": n.name == selected,
        }
        for n in graph_layout.nodes.values()
    ]
    counts = {s: int(m.sum()) for s, m in (("kept", kept), ("added", added), ("removed", removed))}
    return {"width": graph_layout.width, "height": graph_layout.height, "nodes": nodes,
            "edges": out_edges, "counts": counts}


def _at(values: np.ndarray | None, r: int, c: int, digits: int) -> float | None:
    if values is None or not np.isfinite(values[r, c]):
        return None
    return round(float(values[r, c]), digits)


def _label(node: Node) -> str:
    if node.kind == "head":
        return f"{node.layer}.{node.head}"
    return node.name


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
