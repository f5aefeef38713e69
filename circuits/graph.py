"""The computational graph of a transformer, as EAP-IG draws it: the one place names live.

Writers (forward nodes, in order): ``input`` (token + position embeddings), then for each
layer ``l`` every head ``a{l}.h{h}`` and, when the model has MLPs, ``m{l}``.
Readers (backward ports, in order): for each layer ``l`` the query, key and value input of
every head (``a{l}.h{h}<q>``, then all ``<k>``, then all ``<v>``), then ``m{l}``; last
``logits``. An edge ``a0.h1->a1.h2<k>`` says head 0.1's output reaches the key input of
head 1.2 through the residual stream.

Everything is dense: scores and masks are ``[n_forward, n_backward]`` matrices indexed by
the two name lists of a :class:`GraphSpec`; ``spec.valid`` marks the pairs where the writer
comes before the reader (in a parallel attention+MLP block, as in GPTNeoX, the MLP of layer
``l`` does not read the heads of layer ``l``). A ``networkx.DiGraph`` is a view built on
demand by :func:`to_digraph`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from circuits.errors import CircuitsError

_NODE = re.compile(r"^(?:input|logits|m(?P<mlp>\d+)|a(?P<layer>\d+)\.h(?P<head>\d+)(?:<(?P<port>[qkv])>)?)$")


@dataclass(frozen=True)
class NodeName:
    """A parsed node or port name: kind is input, head, mlp or logits; port is q/k/v or None."""

    kind: str
    layer: int | None = None
    head: int | None = None
    port: str | None = None

    @property
    def node(self) -> str:
        """The name of the node this port belongs to (``a1.h2<k>`` -> ``a1.h2``)."""
        return format_node(self.kind, self.layer, self.head)


def format_node(kind: str, layer: int | None = None, head: int | None = None, port: str | None = None) -> str:
    if kind in ("input", "logits"):
        return kind
    if kind == "mlp":
        return f"m{layer}"
    if kind == "head":
        return f"a{layer}.h{head}" + (f"<{port}>" if port else "")
    raise CircuitsError(f"unknown node kind {kind!r}; expected input, head, mlp or logits")


def parse_node(name: str) -> NodeName:
    """``a1.h2<k>`` -> NodeName('head', 1, 2, 'k'); refuses anything else with the format."""
    match = _NODE.match(name)
    if match is None:
        raise CircuitsError(
            f"node name {name!r} not understood; expected input, logits, m{{layer}}, a{{layer}}.h{{head}} "
            "or a{layer}.h{head}<q|k|v>"
        )
    if name in ("input", "logits"):
        return NodeName(name)
    if match["mlp"] is not None:
        return NodeName("mlp", int(match["mlp"]))
    return NodeName("head", int(match["layer"]), int(match["head"]), match["port"])


def edge_name(writer: str, reader: str) -> str:
    return f"{writer}->{reader}"


def parse_edge(name: str) -> tuple[str, str]:
    """``a0.h1->a1.h2<k>`` -> ("a0.h1", "a1.h2<k>"), both names checked."""
    if name.count("->") != 1:
        raise CircuitsError(f"edge name {name!r} not understood; expected writer->reader, e.g. a0.h1->a1.h2<k>")
    writer, reader = name.split("->")
    parse_node(writer), parse_node(reader)
    return writer, reader


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two edge (or node) masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _layer(node: NodeName) -> int:
    """The layer a node sits in; the input sits below every layer (-1)."""
    if node.kind == "input" or node.layer is None:
        return -1
    return node.layer


@dataclass(frozen=True)
class GraphSpec:
    """The shape of a model's graph: names of writers and reader ports, and which pairs exist."""

    n_layers: int
    n_heads: int
    has_mlp: bool = True
    parallel_attn_mlp: bool = False
    forward_names: tuple[str, ...] = field(init=False)
    backward_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise CircuitsError(f"a graph needs n_layers >= 1 and n_heads >= 1, got {self.n_layers} and {self.n_heads}")
        forward = ["input"]
        backward = []
        for layer in range(self.n_layers):
            forward += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            for port in "qkv":
                backward += [f"a{layer}.h{h}<{port}>" for h in range(self.n_heads)]
            if self.has_mlp:
                forward.append(f"m{layer}")
                backward.append(f"m{layer}")
        backward.append("logits")
        object.__setattr__(self, "forward_names", tuple(forward))
        object.__setattr__(self, "backward_names", tuple(backward))

    @classmethod
    def from_model(cls, model) -> GraphSpec:
        """The graph of a TransformerBridge (or anything with a TL-style ``cfg``)."""
        cfg = model.cfg
        return cls(int(cfg.n_layers), int(cfg.n_heads), not bool(getattr(cfg, "attn_only", False)),
                   bool(getattr(cfg, "parallel_attn_mlp", False)))

    @property
    def n_forward(self) -> int:
        return len(self.forward_names)

    @property
    def n_backward(self) -> int:
        return len(self.backward_names)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_forward, self.n_backward)

    def forward_index(self, name: str) -> int:
        try:
            return self.forward_names.index(name)
        except ValueError:
            raise CircuitsError(f"{name!r} is not a writer of this graph (e.g. {self.forward_names[1]})") from None

    def backward_index(self, name: str) -> int:
        try:
            return self.backward_names.index(name)
        except ValueError:
            raise CircuitsError(f"{name!r} is not a reader port of this graph (e.g. {self.backward_names[0]})") from None

    def writer_layer(self, index: int) -> int:
        """-1 for input, else the layer of the head or MLP."""
        return _layer(parse_node(self.forward_names[index]))

    @functools.cached_property
    def valid(self) -> np.ndarray:
        """bool [n_forward, n_backward]: True where the writer feeds the reader's residual input.

        Computed once per spec (selection asks for it at every candidate circuit) and read-only,
        so that no caller can change every later caller's answer."""
        valid = np.zeros(self.shape, dtype=bool)
        for i, writer in enumerate(self.forward_names):
            w = parse_node(writer)
            w_layer = _layer(w)
            for j, reader in enumerate(self.backward_names):
                r = parse_node(reader)
                if r.kind == "logits":
                    valid[i, j] = True
                elif r.kind == "head":
                    valid[i, j] = w_layer < _layer(r)
                else:  # mlp reader
                    same_layer_head = w.kind == "head" and w.layer == r.layer
                    valid[i, j] = w_layer < _layer(r) or (same_layer_head and not self.parallel_attn_mlp)
        valid.setflags(write=False)
        return valid

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def reader_node_index(self) -> np.ndarray:
        """int [n_backward]: the writer index of each reader's node (-1 for logits); read-only."""
        return self._reader_nodes

    @functools.cached_property
    def _reader_nodes(self) -> np.ndarray:
        # once per spec: pruning asks for it at every candidate circuit and bootstrap resample
        out = np.full(self.n_backward, -1, dtype=np.int64)
        for j, reader in enumerate(self.backward_names):
            node = parse_node(reader)
            if node.kind != "logits":
                out[j] = self.forward_names.index(node.node)
        out.setflags(write=False)
        return out

    def edge_names(self, mask: np.ndarray | None = None) -> list[str]:
        """Names of the edges where ``mask`` (default: ``valid``) is True, writer-major order."""
        mask = self.valid if mask is None else np.asarray(mask, dtype=bool) & self.valid
        return [edge_name(self.forward_names[i], self.backward_names[j]) for i, j in zip(*np.nonzero(mask), strict=False)]

    def edge_index(self, name: str) -> tuple[int, int]:
        writer, reader = parse_edge(name)
        i, j = self.forward_index(writer), self.backward_index(reader)
        if not self.valid[i, j]:
            raise CircuitsError(f"edge {name!r} does not exist: the reader does not come after the writer")
        return i, j

    def to_dict(self) -> dict[str, Any]:
        """What a study stores as ``model.graph`` (and an exported graph as its ``spec``)."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "has_mlp": self.has_mlp,
                "parallel_attn_mlp": self.parallel_attn_mlp}

    @classmethod
    def from_dict(cls, data: Any, origin: str = "graph spec") -> GraphSpec:
        """The spec :meth:`to_dict` wrote; anything else is refused with the field named."""
        if not isinstance(data, dict) or set(data) != set(_SPEC_FIELDS):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CircuitsError(f"{origin}: expected the fields {', '.join(_SPEC_FIELDS)}, got {keys}")
        for name, kind in _SPEC_FIELDS.items():
            value = data[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CircuitsError(f"{origin}: field {name!r} is {value!r}, expected {kind.__name__}")
        return cls(data["n_layers"], data["n_heads"], data["has_mlp"], data["parallel_attn_mlp"])


_SPEC_FIELDS: dict[str, type] = {"n_layers": int, "n_heads": int, "has_mlp": bool, "parallel_attn_mlp": bool}


def _check_matrix(spec: GraphSpec, matrix: np.ndarray, label: str) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.shape != spec.shape:
        raise CircuitsError(
            f"{label} has shape {matrix.shape}, expected {spec.shape} (writers x reader ports) for a "
            f"{spec.n_layers}-layer, {spec.n_heads}-head graph{' with MLPs' if spec.has_mlp else ''}"
        )
    return matrix


def _node_attrs(name: str) -> dict[str, Any]:
    parsed = parse_node(name)
    return {"kind": parsed.kind, "layer": -1 if parsed.layer is None else parsed.layer,
            "head": -1 if parsed.head is None else parsed.head}


def to_digraph(spec: GraphSpec, scores: np.ndarray, in_circuit: np.ndarray | None = None,
               only_circuit: bool = False, graph_attrs: dict[str, Any] | None = None):
    """A ``networkx.DiGraph`` over writer nodes and ``logits``; one edge per valid pair.

    Nodes carry ``kind`` (input, head, mlp, logits), ``layer`` and ``head`` (-1 when not
    applicable; logits gets layer ``n_layers``). Edges go writer -> reader node and carry
    ``score``, ``port`` (q, k, v, or "" for MLP and logits readers), ``in_circuit`` and
    ``name`` (``a0.h1->a1.h2<k>``). A head can receive up to three edges from one writer (one per
    port), so parallel edges are merged into one DiGraph edge with ``ports`` listing them and
    ``score`` their sum; the per-port detail stays in ``port_scores``.
    With ``only_circuit`` the graph keeps only circuit edges and their nodes.
    """
    import networkx as nx

    scores = _check_matrix(spec, scores, "scores").astype(float)
    mask = np.zeros(spec.shape, dtype=bool) if in_circuit is None else _check_matrix(spec, in_circuit, "in_circuit")
    mask = mask.astype(bool)
    graph: nx.DiGraph = nx.DiGraph(**(graph_attrs or {}))
    if not only_circuit:
        for name in spec.forward_names:
            graph.add_node(name, **_node_attrs(name))
        graph.add_node("logits", kind="logits", layer=spec.n_layers, head=-1)
    valid = spec.valid
    for i, j in zip(*np.nonzero(valid), strict=False):
        if only_circuit and not mask[i, j]:
            continue
        writer, reader = spec.forward_names[i], spec.backward_names[j]
        port_node = parse_node(reader)
        target = port_node.node
        for name in (writer, target):
            if name not in graph:
                graph.add_node(name, **(_node_attrs(name) if name != "logits" else
                                        {"kind": "logits", "layer": spec.n_layers, "head": -1}))
        port = port_node.port or ""
        score = float(scores[i, j])
        if graph.has_edge(writer, target):
            data = graph.edges[writer, target]
            data["ports"] = data["ports"] + "," + port
            data["port_scores"][port] = score
            data["score"] += score
            data["in_circuit"] = data["in_circuit"] or bool(mask[i, j])
            data["name"] = data["name"] + ";" + edge_name(writer, reader)
        else:
            graph.add_edge(writer, target, score=score, port=port, ports=port, port_scores={port: score},
                           in_circuit=bool(mask[i, j]), name=edge_name(writer, reader))
    return graph


def _flat_for_export(graph):
    """A copy whose attributes are all strings/numbers (GraphML and JSON take no dicts)."""
    out = graph.copy()
    for _, _, data in out.edges(data=True):
        if isinstance(data.get("port_scores"), dict):
            data["port_scores"] = json.dumps(data["port_scores"], sort_keys=True)
    for key, value in list(out.graph.items()):
        if not isinstance(value, (str, int, float, bool)):
            out.graph[key] = json.dumps(value, sort_keys=True, default=str)
    return out


def to_node_link(graph) -> dict[str, Any]:
    """Node-link JSON (``networkx.node_link_data`` with ``edges="links"``), export-ready."""
    import networkx as nx

    return nx.node_link_data(_flat_for_export(graph), edges="links")


def write_node_link(graph, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_node_link(graph), indent=1, sort_keys=True))
    return path


def read_node_link(path: str | Path):
    import networkx as nx

    return nx.node_link_graph(json.loads(Path(path).read_text()), edges="links")


def write_graphml(graph, path: str | Path) -> Path:
    import networkx as nx

    path = Path(path)
    nx.write_graphml(_flat_for_export(graph), str(path))
    return path


def spec_for_study(study, shape: tuple[int, ...] | None = None) -> GraphSpec:
    """The graph spec stored with the study (``study.graph_spec``: the sweep wrote it from the
    model it analysed, never guessed); with ``shape``, checked against a stored matrix's."""
    spec: GraphSpec = study.graph_spec
    if shape is not None and tuple(int(n) for n in shape) != spec.shape:
        raise CircuitsError(f"{study.path}: stored circuit matrices have shape {tuple(shape)}, but the study's "
                            f"graph ({spec.to_dict()}) has {spec.shape}")
    return spec


def circuit_digraph(study, step: int, only_circuit: bool = False):
    """The circuit of ``step`` of a study as a DiGraph (scores and membership as edge attributes)."""
    scores = np.asarray(study.array_at(step, "circuit/scores"))
    in_circuit = np.asarray(study.array_at(step, "circuit/in_circuit")).astype(bool)
    spec = spec_for_study(study, scores.shape)
    attrs = {"step": int(step), "spec": spec.to_dict()}
    return to_digraph(spec, scores, in_circuit, only_circuit=only_circuit, graph_attrs=attrs)
