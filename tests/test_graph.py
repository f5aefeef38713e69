"""circuits.graph: names, the dense spec, the networkx view and its exports."""

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from circuits.errors import CircuitsError
from circuits.graph import (
    GraphSpec,
    circuit_digraph,
    edge_name,
    parse_edge,
    parse_node,
    read_node_link,
    spec_for_study,
    to_digraph,
    to_node_link,
    write_graphml,
    write_node_link,
)


def test_names_and_counts_follow_the_contract():
    spec = GraphSpec(n_layers=2, n_heads=3, has_mlp=True)
    assert spec.forward_names == ("input", "a0.h0", "a0.h1", "a0.h2", "m0", "a1.h0", "a1.h1", "a1.h2", "m1")
    assert spec.backward_names[:10] == ("a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h0<k>", "a0.h1<k>", "a0.h2<k>",
                                        "a0.h0<v>", "a0.h1<v>", "a0.h2<v>", "m0")
    assert spec.backward_names[-1] == "logits"
    L, H = 2, 3
    assert spec.n_forward == 1 + L * (H + 1) and spec.n_backward == L * (3 * H + 1) + 1
    attn_only = GraphSpec(2, 4, has_mlp=False)
    assert attn_only.shape == (1 + 2 * 4, 2 * 12 + 1)


def test_valid_mask_orders_writers_before_readers():
    seq = GraphSpec(2, 2, has_mlp=True)
    par = GraphSpec(2, 2, has_mlp=True, parallel_attn_mlp=True)
    f, b = seq.forward_index, seq.backward_index
    assert seq.valid[f("input"), b("a0.h1<k>")] and not seq.valid[f("a0.h0"), b("a0.h1<k>")]
    assert seq.valid[f("a0.h0"), b("m0")] and not par.valid[f("a0.h0"), b("m0")]
    assert par.valid[f("a0.h0"), b("m1")] and par.valid[f("m1"), b("logits")]
    assert not seq.valid[f("m0"), b("m0")]
    # every writer reaches the logits; the parallel graph lacks exactly the same-layer head -> MLP edges
    assert seq.valid[:, -1].all() and seq.n_edges - par.n_edges == 2 * 2


def test_parse_and_format_round_trip_and_bad_names():
    assert parse_node("a1.h3<k>").node == "a1.h3" and parse_node("a1.h3<k>").port == "k"
    assert parse_node("m2").kind == "mlp" and parse_node("input").kind == "input"
    assert parse_edge(edge_name("a0.h1", "a1.h2<k>")) == ("a0.h1", "a1.h2<k>")
    spec = GraphSpec(2, 4, has_mlp=False)
    assert spec.edge_names()[0] == "input->a0.h0<q>" and len(spec.edge_names()) == spec.n_edges
    assert spec.edge_index("a0.h1->a1.h2<k>") == (2, spec.backward_index("a1.h2<k>"))
    for bad in ("a1.h", "attn1", "a1.h2<x>", ""):
        with pytest.raises(CircuitsError, match="not understood"):
            parse_node(bad)
    with pytest.raises(CircuitsError, match="does not exist"):
        spec.edge_index("a1.h0->a0.h1<q>")
    with pytest.raises(CircuitsError, match="not a writer"):
        spec.forward_index("m0")


def test_digraph_carries_scores_ports_and_membership(tmp_path):
    spec = GraphSpec(2, 2, has_mlp=False)
    scores = np.zeros(spec.shape, dtype=np.float32)
    mask = np.zeros(spec.shape, dtype=bool)
    i, j = spec.edge_index("a0.h1->a1.h0<k>")
    scores[i, j], mask[i, j] = -2.5, True
    j_q = spec.backward_index("a1.h0<q>")
    scores[i, j_q] = 0.5
    graph = to_digraph(spec, scores, mask)
    assert isinstance(graph, nx.DiGraph)
    assert graph.nodes["a0.h1"] == {"kind": "head", "layer": 0, "head": 1}
    assert graph.nodes["logits"]["kind"] == "logits"
    data = graph.edges["a0.h1", "a1.h0"]
    assert data["port_scores"] == {"q": 0.5, "k": -2.5, "v": 0.0}
    assert data["score"] == pytest.approx(-2.0) and data["in_circuit"]
    only = to_digraph(spec, scores, mask, only_circuit=True)
    assert set(only.nodes) == {"a0.h1", "a1.h0"} and only.edges["a0.h1", "a1.h0"]["port"] == "k"
    back = read_node_link(write_node_link(graph, tmp_path / "g.json"))
    assert back.edges["a0.h1", "a1.h0"]["in_circuit"] is True
    assert json.loads(back.edges["a0.h1", "a1.h0"]["port_scores"])["k"] == -2.5
    assert nx.read_graphml(write_graphml(graph, tmp_path / "g.graphml")).number_of_edges() == graph.number_of_edges()
    assert "links" in to_node_link(graph)
    with pytest.raises(CircuitsError, match="expected"):
        to_digraph(spec, scores[:, :-1])


def test_circuit_digraph_reads_a_study():
    spec = GraphSpec(1, 2, has_mlp=True, parallel_attn_mlp=True)
    scores = np.arange(np.prod(spec.shape), dtype=np.float32).reshape(spec.shape) * spec.valid
    mask = spec.valid & (scores > 5)

    class FakeStudy:
        path = Path("fake")
        graph_spec = spec

        def array_at(self, step, key):
            return {"circuit/scores": scores, "circuit/in_circuit": mask}[key]

    graph = circuit_digraph(FakeStudy(), 10)
    assert graph.graph["step"] == 10 and not graph.has_edge("a0.h0", "m0")
    assert sum(d["in_circuit"] for *_, d in graph.edges(data=True)) > 0


def test_a_study_whose_matrices_do_not_fit_its_stored_graph_is_refused():
    class FakeStudy:
        path = Path("fake")
        graph_spec = GraphSpec(1, 2, has_mlp=True, parallel_attn_mlp=True)

    with pytest.raises(CircuitsError, match=r"fake: stored circuit matrices have shape \(4, 7\)"):
        spec_for_study(FakeStudy(), (4, 7))


@pytest.mark.parametrize("spec", [GraphSpec(2, 4), GraphSpec(1, 2, has_mlp=False), GraphSpec(3, 2, parallel_attn_mlp=True)])
def test_graph_spec_round_trips_through_its_dict(spec):
    assert GraphSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(("data", "message"), [
    ({"n_layers": 2, "n_heads": 4, "has_mlp": True}, "expected the fields n_layers, n_heads, has_mlp, parallel_attn_mlp"),
    ({"n_layers": 2, "n_heads": 4, "has_mlp": 1, "parallel_attn_mlp": False}, "field 'has_mlp' is 1, expected bool"),
    ({"n_layers": True, "n_heads": 4, "has_mlp": True, "parallel_attn_mlp": False}, "field 'n_layers' is True, expected int"),
    ("neox", "expected the fields"),
])
def test_a_damaged_graph_spec_is_refused_with_its_field(data, message):
    with pytest.raises(CircuitsError, match=f"study.json: .*{message}"):
        GraphSpec.from_dict(data, "study.json: field 'model.graph'")
