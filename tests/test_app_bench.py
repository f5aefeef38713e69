"""The app benchmark's plumbing on small synthetic studies (timings are not asserted here:
`circuits bench` records them)."""

from __future__ import annotations

import numpy as np
import pytest

from circuits.bench.app import browser_measure, browser_missing, measure, synthetic_study
from circuits.errors import CircuitsError


def test_bench_measures_open_and_step_switch(tmp_path):
    study = synthetic_study(tmp_path / "study", n_edges=100, n_steps=6)
    result = measure(study, n_switches=3)
    assert result["n_steps"] == 6
    assert result["edges_drawn_last"] == 100
    assert result["open_s_median"] > 0 and result["step_switch_ms_median"] > 0
    assert set(result) >= {"open_landing_s", "step_switch_ms_max", "meets_goals"}


def test_synthetic_study_of_pythia_160m_shape_has_its_edges(tmp_path):
    import circuits

    study = circuits.open_study(synthetic_study(tmp_path / "study", n_edges=50, n_steps=2, shape="160m"))
    spec = study.graph_spec
    assert (spec.n_layers, spec.n_heads, spec.has_mlp, spec.parallel_attn_mlp) == (12, 12, True, True)
    # by hand: a layer-l head port or MLP reads the input and the 13 writers of each earlier layer;
    # the logits read all 1 + 12 * 13 writers
    expected = sum((36 + 1) * (1 + 13 * layer) for layer in range(12)) + 1 + 12 * 13
    scores = np.asarray(study.array("circuit/scores"))
    assert np.isfinite(scores[0]).sum() == expected == 32_347
    assert np.asarray(study.array("circuit/in_circuit"))[1].sum() == 50
    assert [int(s) for s in study.steps] == [0, 1]  # the first steps of Pythia's schedule


def test_an_unknown_synthetic_shape_is_refused(tmp_path):
    with pytest.raises(CircuitsError, match="unknown synthetic study shape '7b'; expected one of 70m, 160m, demo"):
        synthetic_study(tmp_path / "study", shape="7b")


@pytest.mark.slow
def test_browser_figures_cover_open_switches_and_clicks(tmp_path):
    if browser_missing():
        pytest.skip(f"no browser here: {browser_missing()}")
    study = synthetic_study(tmp_path / "demo", n_edges=12, n_examples=2, seq_len=8, n_steps=4, shape="demo")
    result = browser_measure(study, n_switches=3, n_opens=2)
    assert result["n_steps"] == 4 and result["n_switches"] == 3
    assert result["edges_drawn"] == 12 and result["bundles_drawn"] == 0  # the last step's circuit, drawn whole
    for key in ("landing_open_s_first", "landing_open_s_median", "page_open_s_cold", "page_open_s_median", "step_switch_ms_median", "step_switch_ms_min",
                "step_switch_ms_max", "graph_drawing_ms_median", "node_click_ms_median", "node_click_ms_max"):
        assert result[key] > 0, key
    assert result["step_switch_ms_min"] <= result["step_switch_ms_median"] <= result["step_switch_ms_max"]
