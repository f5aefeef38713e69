"""The Circuit page's graph on a Pythia-160m-sized study (synthetic: no trained run needed),
through AppTest: what the component is handed in the key-edges view and for a big circuit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from circuits.bench.app import _circuit_page, synthetic_study

N_CIRCUIT = 500  # edges in each step's (full-data) circuit: more than the view draws one by one


@pytest.fixture(scope="module")
def big_study(tmp_path_factory):
    return synthetic_study(tmp_path_factory.mktemp("graph-page") / "study", n_edges=N_CIRCUIT, n_examples=2,
                           seq_len=8, n_steps=3, shape="160m")


def drawn(study, **params) -> tuple[dict, dict]:
    """(what the graph component was handed, the page's metrics) after one run of the Circuit page."""
    at = _circuit_page(study, **params)
    at.run()
    assert not at.exception, at.exception
    (component,) = at.get("bidi_component")
    return json.loads(component.proto.json), {m.label: m.value for m in at.metric}


def test_key_edges_of_a_160m_sized_graph_draw_60_and_bundle_every_other_edge(big_study):
    import circuits

    scores = np.asarray(circuits.open_study(big_study).array("circuit/scores"))[1]
    n_scored = int((np.isfinite(scores) & (scores != 0)).sum())  # 32,347 for this shape
    view, metrics = drawn(big_study, step=1, mode="key")
    on_step = [e for e in view["edges"] if e["status"] != "removed"]
    assert len(on_step) == 60 and metrics["Edges drawn"] == "60"
    assert sum(b["count"] for b in view["bundles"]) == n_scored - 60
    assert view["note"].startswith(f"The 60 strongest edges are drawn one by one; the other {n_scored - 60:,} ")


def test_a_big_circuit_is_drawn_as_its_strongest_edges_by_default(big_study):
    view, metrics = drawn(big_study, step=2)  # the default view: this study's (full-data) circuit
    on_step = [e for e in view["edges"] if e["status"] != "removed"]
    assert metrics["Edges drawn"] == str(N_CIRCUIT)  # the count speaks of the whole circuit
    assert len(on_step) == 60 and sum(b["count"] for b in view["bundles"]) == N_CIRCUIT - 60


def test_the_graph_is_laid_out_for_the_page_drawing_area_with_names_used_everywhere(big_study):
    view, _ = drawn(big_study, step=2)
    assert (view["width"], view["height"]) == (760.0, 500.0)
    assert {"a11.h11", "m0", "input", "logits"} <= {n["label"] for n in view["nodes"]}
    assert all(n["label"] == n["id"] for n in view["nodes"])
