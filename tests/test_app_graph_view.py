"""The circuit view's pure data: fixed positions, edge selection, diffs, Jaccard (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest

from app import graph_view as gv
from circuits.errors import CircuitsError

FORWARD = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
BACKWARD = ["a0.h0<q>", "a0.h0<k>", "a0.h0<v>", "a0.h1<q>", "a0.h1<k>", "a0.h1<v>", "m0",
            "a1.h0<q>", "a1.h0<k>", "a1.h0<v>", "a1.h1<q>", "a1.h1<k>", "a1.h1<v>", "m1", "logits"]


def test_parse_node_names():
    assert gv.parse_node("a1.h0<k>") == gv.Parsed("a1.h0", "head", 1, 0, "k")
    assert gv.parse_node("m3").kind == "mlp"
    assert gv.parse_node("input").layer is None
    with pytest.raises(CircuitsError, match="not understood"):
        gv.parse_node("<script>")


def test_layout_is_fixed_grid_bottom_to_top():
    lay = gv.layout(FORWARD, BACKWARD)
    nodes = lay.nodes
    assert set(nodes) == {"input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"}
    # input lowest (largest y), logits highest; heads of a layer share a row; MLP above its heads
    assert nodes["input"].y > nodes["a0.h0"].y > nodes["m0"].y > nodes["a1.h0"].y > nodes["m1"].y > nodes["logits"].y
    assert nodes["a0.h0"].y == nodes["a0.h1"].y and nodes["a0.h0"].x < nodes["a0.h1"].x
    assert nodes["a0.h1"].x == nodes["a1.h1"].x  # same head, same column: change is visible
    assert gv.layout(FORWARD, BACKWARD) == lay  # deterministic


def test_select_edges_modes():
    scores = np.array([[0.5, -2.0, np.nan], [0.1, 0.0, 1.0]])
    stored = np.array([[True, False, True], [False, False, False]])
    assert gv.select_edges(scores, stored, "circuit").tolist() == [[True, False, False], [False, False, False]]
    assert gv.select_edges(scores, None, "threshold", threshold=0.5).tolist() == [
        [True, True, False], [False, False, True]]
    assert gv.select_edges(scores, None, "top-n", top_n=2).tolist() == [[False, True, False], [False, False, True]]
    assert gv.select_edges(scores, None, "top-n", top_n=100).sum() == 4  # zero scores never drawn
    assert gv.select_edges(scores, None, "top-n", top_n=0).sum() == 0
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


def test_view_marks_added_removed_and_styles_by_score():
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
    assert edges["a0.h0->a1.h1<k>"]["color"] == gv.ADDED
    assert edges["a0.h0->a1.h1<k>"]["dst"] == "a1.h1" and edges["a0.h0->a1.h1<k>"]["port"] == "k"
    assert edges["a1.h1->logits"]["status"] == "kept" and edges["a1.h1->logits"]["color"] == gv.NEGATIVE
    assert edges["input->a0.h0<q>"]["status"] == "removed"
    assert edges["a0.h0->a1.h1<k>"]["width"] > edges["a1.h1->logits"]["width"]  # width by |score|
    assert out["counts"] == {"kept": 1, "added": 1, "removed": 1}
    nodes = {n["id"]: n for n in out["nodes"]}
    assert nodes["a1.h1"]["selected"] and nodes["a1.h1"]["active"]
    assert not nodes["a0.h1"]["active"]  # untouched head drawn faint
    assert nodes["a0.h1"]["x"] == lay.nodes["a0.h1"].x  # positions come from the fixed layout
