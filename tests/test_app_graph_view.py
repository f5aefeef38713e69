"""The circuit view's pure data: layered layout with q/k/v ports, routing around nodes, key edges
and bundles, diffs, Jaccard, the edge table (hand-computed, or recomputed here independently)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from app import graph_view as gv
from app.formation import EdgeStats
from circuits.errors import CircuitsError
from circuits.graph import GraphSpec

FORWARD = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
BACKWARD = ["a0.h0<q>", "a0.h0<k>", "a0.h0<v>", "a0.h1<q>", "a0.h1<k>", "a0.h1<v>", "m0",
            "a1.h0<q>", "a1.h0<k>", "a1.h0<v>", "a1.h1<q>", "a1.h1<k>", "a1.h1<v>", "m1", "logits"]


def spec_scores(spec: GraphSpec, seed: int = 0) -> np.ndarray:
    """Random scores on the spec's edges, NaN where no edge can be (as the app reads a study)."""
    rng = np.random.default_rng(seed)
    return np.where(spec.valid, rng.normal(size=spec.shape), np.nan)


def segment_hits_box(p, q, box) -> bool:
    """Liang-Barsky: does the segment p-q meet the open rectangle (left, top, right, bottom)?"""
    left, top, right, bottom = box
    (x0, y0), (x1, y1) = p, q
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for pk, qk in ((-dx, x0 - left), (dx, right - x0), (-dy, y0 - top), (dy, bottom - y0)):
        if pk == 0:
            if qk <= 0:
                return False
            continue
        t = qk / pk
        if pk < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
        if lo >= hi:
            return False
    return True


def test_parse_node_names():
    assert gv.parse_node("a1.h0<k>") == gv.Parsed("a1.h0", "head", 1, 0, "k")
    assert gv.parse_node("m3").kind == "mlp"
    assert gv.parse_node("input").layer is None
    with pytest.raises(CircuitsError, match="not understood"):
        gv.parse_node("<script>")


def test_layout_rows_bottom_to_top_with_heads_in_fixed_columns():
    lay = gv.layout(FORWARD, BACKWARD)
    nodes = lay.nodes
    assert set(nodes) == {"input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"}
    assert nodes["input"].y > nodes["a0.h0"].y > nodes["m0"].y > nodes["a1.h0"].y > nodes["m1"].y > nodes["logits"].y
    assert nodes["a0.h0"].y == nodes["a0.h1"].y and nodes["a0.h0"].x < nodes["a0.h1"].x
    assert nodes["a0.h1"].x == nodes["a1.h1"].x  # same head, same column: change is visible
    assert gv.layout(FORWARD, BACKWARD) == lay  # deterministic


@pytest.mark.parametrize(("spec", "width", "height"), [
    (GraphSpec(2, 4, has_mlp=False), 760.0, 500.0),  # the demo's shape
    (GraphSpec(12, 12, has_mlp=True, parallel_attn_mlp=True), 760.0, 500.0),  # Pythia-160m's
    (GraphSpec(6, 8, has_mlp=True), 400.0, 300.0),
])
def test_layout_fits_the_drawing_area_and_boxes_do_not_overlap(spec, width, height):
    lay = gv.layout(list(spec.forward_names), list(spec.backward_names), width, height)
    boxes = [n.box for n in lay.nodes.values()]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width - gv.GUTTER and 0 <= top < bottom <= height
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_edges_into_a_head_end_at_its_q_k_or_v_port():
    lay = gv.layout(FORWARD, BACKWARD)
    scores = np.zeros((len(FORWARD), len(BACKWARD)))
    current = np.zeros(scores.shape, dtype=bool)
    for port in "qkv":
        scores[FORWARD.index("a0.h0"), BACKWARD.index(f"a1.h1<{port}>")] = -1.0
        current[FORWARD.index("a0.h0"), BACKWARD.index(f"a1.h1<{port}>")] = True
    out = gv.view(lay, FORWARD, BACKWARD, scores, current)
    ends = {e["port"]: e["points"][-1] for e in out["edges"]}
    head = lay.nodes["a1.h1"]
    left, _, right, bottom = head.box
    assert set(ends) == {"q", "k", "v"}
    assert all(y == pytest.approx(bottom, abs=0.1) for _, y in ends.values())  # on the box's bottom edge
    assert left < ends["q"][0] < ends["k"][0] < ends["v"][0] < right  # q left, k middle, v right
    node = next(n for n in out["nodes"] if n["id"] == "a1.h1")
    assert [p[0] for p in node["ports"]] == ["q", "k", "v"]
    assert [(round(x, 1), round(y, 1)) for _, x, y in node["ports"]] == [tuple(ends[p]) for p in "qkv"]  # marks where edges end


@pytest.mark.parametrize("spec", [GraphSpec(3, 3, has_mlp=True), GraphSpec(2, 4, has_mlp=False),
                                  GraphSpec(12, 12, has_mlp=True, parallel_attn_mlp=True)])
def test_no_edge_segment_passes_through_a_node_box(spec):
    forward, backward = list(spec.forward_names), list(spec.backward_names)
    lay = gv.layout(forward, backward, 760.0, 500.0)
    pairs = list(zip(*np.nonzero(spec.valid), strict=True))
    pairs = pairs[::max(1, len(pairs) // 500)]  # a spread of ~500 edges of the big graph: every skip length
    assert pairs
    for i, j in pairs:
        writer, reader = forward[i], gv.parse_node(backward[j])
        points = gv.route(lay, writer, reader.name, reader.port)
        assert points[0] == pytest.approx(lay.nodes[writer].exit, abs=0.051)  # paths are kept to 0.1 px
        assert points[-1] == pytest.approx(lay.nodes[reader.name].entry(reader.port), abs=0.051)
        for node in lay.nodes.values():
            if node.name in (writer, reader.name):
                continue
            left, top, right, bottom = node.box
            grown = (left - 1, top - 1, right + 1, bottom + 1)  # clear by a pixel, so rounding stays clear
            for p, q in zip(points, points[1:], strict=False):
                assert not segment_hits_box(p, q, grown), (writer, backward[j], node.name, p, q)


def test_an_edge_skipping_a_layer_bends_around_the_node_in_its_way():
    lay = gv.layout(FORWARD, BACKWARD)
    points = gv.route(lay, "input", "logits")  # straight up would cross every MLP on the centre line
    assert len(points) > 2
    assert any(abs(x - lay.nodes["m0"].x) > lay.nodes["m0"].w / 2 for x, _ in points[1:-1])


def layer_of(name: str) -> str:
    match = re.match(r"a(\d+)\.h\d+|m(\d+)", name)
    return name if match is None else f"layer {match.group(1) or match.group(2)}"


def test_key_edges_draw_the_strongest_and_bundle_the_rest_by_layer_pair():
    spec = GraphSpec(3, 4, has_mlp=True)
    forward, backward = list(spec.forward_names), list(spec.backward_names)
    scores = spec_scores(spec)
    current = gv.select_edges(scores, None, "key")
    rest = np.isfinite(scores) & ~current
    out = gv.view(gv.layout(forward, backward), forward, backward, scores, current, rest=rest)
    by_strength = sorted(spec.edge_names(), key=lambda e: -abs(scores[spec.edge_index(e)]))
    assert sorted(e["id"] for e in out["edges"]) == sorted(by_strength[:gv.KEY_EDGES])
    expected: dict[tuple[str, str], list[float]] = {}
    for name in by_strength[gv.KEY_EDGES:]:
        writer, reader = name.split("->")
        expected.setdefault((layer_of(writer), layer_of(reader.split("<")[0])), []).append(abs(scores[spec.edge_index(name)]))
    got = {(b["src"], b["dst"]): b for b in out["bundles"]}
    assert set(got) == set(expected)
    for pair, values in expected.items():
        assert got[pair]["count"] == len(values) and got[pair]["sum"] == pytest.approx(sum(values), abs=1e-5)
    assert out["note"] == (f"The {gv.KEY_EDGES} strongest edges are drawn one by one; the other "
                           f"{spec.n_edges - gv.KEY_EDGES:,} are bundled by layer pair into {len(expected)} grey arcs "
                           "on the right (width: summed |score|; each names its count and sum).")


def test_bundles_run_in_the_gutter_right_of_every_node():
    spec = GraphSpec(3, 4, has_mlp=True)
    forward, backward = list(spec.forward_names), list(spec.backward_names)
    lay = gv.layout(forward, backward)
    out = gv.bundles(lay, forward, backward, spec_scores(spec), spec.valid)
    right_of_nodes = max(n.box[2] for n in lay.nodes.values())
    assert out and all(x > right_of_nodes and x <= lay.width for b in out for x, _ in b["points"])


def test_a_selection_too_big_to_read_is_drawn_as_its_strongest_edges_plus_bundles():
    spec = GraphSpec(4, 8, has_mlp=True)
    forward, backward = list(spec.forward_names), list(spec.backward_names)
    scores = spec_scores(spec, seed=1)
    current = spec.valid.copy()  # every edge: more than DRAW_LIMIT
    assert current.sum() > gv.DRAW_LIMIT
    out = gv.view(gv.layout(forward, backward), forward, backward, scores, current)
    assert len(out["edges"]) == gv.KEY_EDGES
    assert sum(b["count"] for b in out["bundles"]) == current.sum() - gv.KEY_EDGES
    assert out["counts"]["kept"] == current.sum()  # the counts speak of the whole selection
    small = gv.view(gv.layout(forward, backward), forward, backward, scores, gv.select_edges(scores, None, "top-n", top_n=20))
    assert len(small["edges"]) == 20 and small["bundles"] == [] and small["note"] is None


def test_colour_says_needed_for_negative_and_opposing_for_positive_scores():
    lay = gv.layout(FORWARD, BACKWARD)
    scores = np.zeros((len(FORWARD), len(BACKWARD)))
    scores[FORWARD.index("a1.h1"), BACKWARD.index("logits")] = -1.0
    scores[FORWARD.index("a1.h0"), BACKWARD.index("logits")] = 0.5
    out = gv.view(lay, FORWARD, BACKWARD, scores, scores != 0)
    colours = {e["id"]: e["color"] for e in out["edges"]}
    assert colours == {"a1.h1->logits": gv.NEEDED, "a1.h0->logits": gv.OPPOSING}


def test_view_marks_added_and_removed_and_widths_follow_score():
    lay = gv.layout(FORWARD, BACKWARD)
    scores = np.zeros((len(FORWARD), len(BACKWARD)))
    f, b = FORWARD.index, BACKWARD.index
    scores[f("a0.h0"), b("a1.h1<k>")] = 2.0
    scores[f("a1.h1"), b("logits")] = -1.0
    scores[f("input"), b("a0.h0<q>")] = 0.5
    prev = np.zeros_like(scores, dtype=bool)
    prev[f("input"), b("a0.h0<q>")] = prev[f("a1.h1"), b("logits")] = True
    cur = np.zeros_like(prev)
    cur[f("a0.h0"), b("a1.h1<k>")] = cur[f("a1.h1"), b("logits")] = True
    out = gv.view(lay, FORWARD, BACKWARD, scores, cur, prev, selected="a1.h1")
    edges = {e["id"]: e for e in out["edges"]}
    assert edges["a0.h0->a1.h1<k>"]["status"] == "added"
    assert edges["a0.h0->a1.h1<k>"]["dst"] == "a1.h1" and edges["a0.h0->a1.h1<k>"]["port"] == "k"
    assert edges["a1.h1->logits"]["status"] == "kept"
    assert edges["input->a0.h0<q>"]["status"] == "removed"
    assert edges["a0.h0->a1.h1<k>"]["width"] > edges["a1.h1->logits"]["width"]  # width by |score|
    assert out["counts"] == {"kept": 1, "added": 1, "removed": 1}
    assert out["selected"] == "a1.h1"
    nodes = {n["id"]: n for n in out["nodes"]}
    assert nodes["a1.h1"]["active"] and not nodes["a0.h1"]["active"]  # untouched head drawn faint
    assert nodes["a0.h1"]["x"] == lay.nodes["a0.h1"].x  # positions come from the fixed layout


def test_nodes_are_labelled_with_the_names_used_everywhere():
    out = gv.view(gv.layout(FORWARD, BACKWARD), FORWARD, BACKWARD, np.zeros((7, 15)), np.zeros((7, 15), dtype=bool))
    assert sorted(n["label"] for n in out["nodes"]) == sorted(n["id"] for n in out["nodes"])
    assert {n["label"] for n in out["nodes"]} >= {"a1.h1", "m0", "input", "logits"}


def test_detector_roles_become_badges_on_their_heads():
    out = gv.view(gv.layout(FORWARD, BACKWARD), FORWARD, BACKWARD, np.zeros((7, 15)), np.zeros((7, 15), dtype=bool),
                  roles={"a1.h1": ["induction"], "a0.h0": ["previous_token", "my_detector"]})
    badges = {n["id"]: n["roles"] for n in out["nodes"] if n["roles"]}
    assert badges == {"a1.h1": [["IND", "induction"]],
                      "a0.h0": [["PREV", "previous token"], ["MY_D", "my detector"]]}


def test_stable_circuit_edges_take_their_resampling_share_as_opacity():
    lay = gv.layout(FORWARD, BACKWARD)
    scores = np.zeros((7, 15))
    scores[FORWARD.index("a1.h1"), BACKWARD.index("logits")] = -1.0
    scores[FORWARD.index("a1.h0"), BACKWARD.index("logits")] = -0.5
    inclusion = np.full(scores.shape, np.nan)
    inclusion[FORWARD.index("a1.h1"), BACKWARD.index("logits")] = 0.85
    inclusion[FORWARD.index("a1.h0"), BACKWARD.index("logits")] = 1.0
    stats = EdgeStats(inclusion, None)
    out = gv.view(lay, FORWARD, BACKWARD, scores, scores != 0, stats=stats, opacity_by_inclusion=True)
    assert {e["id"]: e["opacity"] for e in out["edges"]} == {"a1.h1->logits": 0.85, "a1.h0->logits": 1.0}
    assert "share of bootstrap resamples" in out["opacity_note"]
    plain = gv.view(lay, FORWARD, BACKWARD, scores, scores != 0, stats=stats)
    assert len({e["opacity"] for e in plain["edges"]}) == 1 and plain["opacity_note"] is None


def test_select_edges_modes():
    scores = np.array([[0.5, -2.0, np.nan], [0.1, 0.0, 1.0]])
    stored = np.array([[True, False, True], [False, False, False]])
    assert gv.select_edges(scores, stored, "circuit").tolist() == [[True, False, False], [False, False, False]]
    assert gv.select_edges(scores, None, "threshold", threshold=0.5).tolist() == [
        [True, True, False], [False, False, True]]
    assert gv.select_edges(scores, None, "top-n", top_n=2).tolist() == [[False, True, False], [False, False, True]]
    assert gv.select_edges(scores, None, "top-n", top_n=100).sum() == 4  # zero scores never drawn
    assert gv.select_edges(scores, None, "top-n", top_n=0).sum() == 0
    assert gv.select_edges(scores, None, "key").sum() == 4  # at most KEY_EDGES of the scored edges
    with pytest.raises(ValueError, match="unknown edge selection"):
        gv.select_edges(scores, stored, "all")


def test_diff_and_jaccard():
    prev = np.array([[True, True, False]])
    cur = np.array([[False, True, True]])
    kept, added, removed = gv.diff(prev, cur)
    assert kept.tolist() == [[False, True, False]]
    assert added.tolist() == [[False, False, True]]
    assert removed.tolist() == [[True, False, False]]
    assert gv.diff(None, cur)[1].sum() == 0
    m = gv.jaccard_matrix(np.stack([prev, cur, np.zeros_like(cur)]))
    assert m[0, 1] == pytest.approx(1 / 3) and m[1, 0] == pytest.approx(1 / 3)
    assert m[0, 0] == 1.0 and m[2, 2] == 1.0 and m[0, 2] == 0.0


def test_a_nodes_edge_table_lists_its_edges_strongest_first():
    spec = GraphSpec(2, 2, has_mlp=True)
    forward, backward = list(spec.forward_names), list(spec.backward_names)
    scores = spec_scores(spec, seed=3)
    rows = gv.edge_rows(forward, backward, scores, spec.valid & gv.touching(forward, backward, "a1.h0"),
                        EdgeStats(None, None), {})
    mine = [e for e in spec.edge_names() if e.startswith("a1.h0->") or e.split("->")[1].startswith("a1.h0<")]
    assert [r["edge"] for r in rows] == sorted(mine, key=lambda e: -abs(scores[spec.edge_index(e)]))
