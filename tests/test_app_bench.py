"""The app benchmark runs end to end on a small synthetic study (timings are not asserted here:
`circuits bench` records them)."""

from __future__ import annotations

from circuits.bench.app import measure, synthetic_study


def test_bench_measures_open_and_step_switch(tmp_path):
    study = synthetic_study(tmp_path / "study", n_edges=100, n_steps=6)
    result = measure(study, n_switches=3)
    assert result["n_steps"] == 6
    assert result["edges_drawn_last"] == 100
    assert result["open_s_median"] > 0 and result["step_switch_ms_median"] > 0
    assert set(result) >= {"open_overview_s", "step_switch_ms_max", "meets_goals"}
