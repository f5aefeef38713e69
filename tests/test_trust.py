"""How far to trust the method (issue 13, item 7): circuits/discovery/trust.py, the sweep's choice
of steps, the settings, and the stored report against an independent exact patching."""

from __future__ import annotations

import numpy as np
import pytest

from circuits.config import SweepConfig
from circuits.discovery.trust import (
    TRUST_FIELDS,
    TrustReport,
    average_ranks,
    compare_scores,
    spearman,
    trust_text,
)
from circuits.errors import CircuitsError
from circuits.steps import spread_steps


def _grid(values, invalid=()):
    """Scores on a 4 x 5 grid: ``values`` fill the valid cells in order; ``invalid`` cells are 0."""
    valid = np.ones((4, 5), dtype=bool)
    for cell in invalid:
        valid[cell] = False
    scores = np.zeros((4, 5))
    scores[valid] = values
    return scores, valid


def _top(scores, valid, k):
    mask = np.zeros(scores.shape, dtype=bool)
    order = np.argsort(-np.where(valid, np.abs(scores), -np.inf), axis=None, kind="stable")[:k]
    mask.flat[order] = True
    return mask


# ---------------------------------------------------------------- compare_scores, by hand


def test_identical_scores_agree_fully_and_are_not_poor():
    scores, valid = _grid(-np.arange(1, 19, dtype=float), invalid=[(0, 0), (3, 4)])
    report = compare_scores(scores, scores, valid, _top(scores, valid, 5))
    assert report.spearman_signed == pytest.approx(1.0) and report.spearman_abs == pytest.approx(1.0)
    assert report.k == 5 and report.topk_overlap == 1.0 and report.worst_rank == 5
    assert report.top10_overlap == 10 and report.n_edges == 18 and not report.poor


def test_reversed_ranks_give_rho_minus_one_and_poor():
    values = np.arange(1, 19, dtype=float)
    method, valid = _grid(values, invalid=[(0, 0), (3, 4)])
    exact, _ = _grid(values[::-1], invalid=[(0, 0), (3, 4)])
    report = compare_scores(method, exact, valid, _top(method, valid, 4))
    assert report.spearman_signed == pytest.approx(-1.0) and report.spearman_abs == pytest.approx(-1.0)
    # the method's top 4 are exact patching's bottom 4: ranks 15..18 of 18
    assert report.topk_overlap == 0.0 and report.worst_rank == 18 and report.top10_overlap == 2
    assert report.poor


def test_a_circuit_edge_ranked_beyond_2k_is_poor_even_with_high_overlap():
    values = -np.arange(20, 0, -1, dtype=float)  # |score| 20, 19, ..., 1
    method, valid = _grid(values)
    exact = method.copy()
    exact.flat[[4, 10]] = exact.flat[[10, 4]]  # the method's 5th edge is exact patching's 11th
    report = compare_scores(method, exact, valid, _top(method, valid, 5))
    assert report.topk_overlap == pytest.approx(0.8) and report.worst_rank == 11 and report.poor
    near = exact.copy()
    near.flat[[4, 5]] = near.flat[[5, 4]]  # only swapped with the next edge: ranked k + 1, within 2k
    ok = compare_scores(method, near, valid, _top(method, valid, 5))
    assert ok.topk_overlap == pytest.approx(0.8) and ok.worst_rank == 6 and not ok.poor


def test_ties_get_averaged_ranks_and_share_the_best_rank():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    a, b = np.array([1.0, 2.0, 2.0, 3.0, 5.0]), np.array([2.0, 1.0, 4.0, 4.0, 9.0])
    ra, rb = average_ranks(a), average_ranks(b)
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    try:  # scipy, where installed, agrees (it is not a dependency)
        from scipy.stats import spearmanr

        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    except ImportError:
        pass
    assert np.isnan(spearman(np.ones(5), b))  # a constant scoring has no ranking
    # tied |score| at the boundary: both edges share rank 2, so both count as in the top 2
    method, valid = _grid([-4.0, -3.0, 1.0] + [0.1] * 17)
    exact, _ = _grid([-4.0, -2.0, 2.0] + [0.1] * 17)
    report = compare_scores(method, exact, valid, _top(method, valid, 2))
    assert report.topk_overlap == 1.0 and report.worst_rank == 2 and not report.poor


def test_an_empty_circuit_is_never_poor_and_round_trips_through_the_stored_layout():
    scores, valid = _grid(np.linspace(-1, 1, 20))
    report = compare_scores(scores, -scores, valid, np.zeros_like(valid))
    assert report.k == 0 and np.isnan(report.topk_overlap) and np.isnan(report.worst_rank) and not report.poor
    stored = report.to_array()
    assert stored.shape == (len(TRUST_FIELDS),) and stored.dtype == np.float32
    back = TrustReport.from_array(stored, step=7)
    assert back is not None and back.step == 7 and back.k == 0 and back.top10_overlap == report.top10_overlap
    assert TrustReport.from_array(np.full(len(TRUST_FIELDS), np.nan)) is None
    assert back.to_dict()["topk_overlap"] is None  # JSON-safe


def test_compare_scores_refuses_mismatched_shapes():
    with pytest.raises(CircuitsError, match="one shape"):
        compare_scores(np.zeros((2, 3)), np.zeros((3, 2)), np.ones((2, 3), bool), np.zeros((2, 3), bool))


# ---------------------------------------------------------------- the text


def _report(poor: bool, step: int = 1000) -> TrustReport:
    return TrustReport(0.66, 0.94, 0.9 if poor else 1.0, 21, 9, 25.0 if poor else 21.0, poor, 81, step)


def test_the_text_gives_rho_and_overlap_and_names_the_remedy_when_poor():
    lines = trust_text([_report(False, 500), _report(True)], "eap-ig", 5)
    text = "\n".join(lines)
    assert "EAP-IG(5) vs exact: rho 0.66 signed, 0.94 on |score|, top-10 overlap 9/10" in text
    assert "poor at step(s) 1000" in text and "--ig-steps" in text and "--method patching" in text
    assert "poor at" not in "\n".join(trust_text([_report(False)], "eap-ig", 5))
    assert trust_text([], "patching", 5) == ["how far to trust the scores: they are exact patching (nothing to check)"]
    assert "new --out" in trust_text([], "eap", 5)[0]  # a study swept before trust checks
    assert trust_text([], "none", 5) == []


# ---------------------------------------------------------------- which steps, which settings


def test_steps_are_spread_with_the_last_included():
    assert spread_steps(list(range(0, 1001, 100)), 5) == [0, 300, 500, 800, 1000]
    assert spread_steps([0, 1, 2, 4, 8, 16], 2) == [0, 16]
    assert spread_steps([0, 10, 20], 1) == [20]
    assert spread_steps([5, 7, 9], 5) == [5, 7, 9]  # fewer steps than asked: all
    assert spread_steps([5, 7, 9], 0) == []
    for n in range(1, 12):
        chosen = spread_steps(list(range(11)), n)
        assert len(chosen) == n and chosen[-1] == 10


@pytest.mark.parametrize("setting", [{"trust_steps": -1}, {"trust_max_edges": -5}, {"trust_steps": 2.5},
                                     {"trust_steps": True}])
def test_bad_trust_settings_are_refused_by_name(setting):
    name = next(iter(setting)).replace("_", "-")
    with pytest.raises(CircuitsError, match=f"--{name} .*whole number >= 0"):
        SweepConfig(**setting)


def test_the_settings_reach_the_analyses():
    options = SweepConfig(method="eap-ig", trust_steps=0, trust_max_edges=100).analysis_options()
    assert options["trust_steps"] == 0 and options["trust_max_edges"] == 100


# ---------------------------------------------------------------- journey: the stored report is exact patching


def test_the_stored_trust_report_equals_an_independent_exact_patching(induction_run, tmp_path):
    from circuits import load
    from circuits.discovery.functional import FunctionalModel
    from circuits.discovery.scoring import score_patching
    from circuits.discovery.trust import trust_from_study
    from circuits.sweep import sweep

    study = sweep(induction_run, "induction", tmp_path / "study", steps="400,600,1000", hooks="none",
                  method="eap-ig", trust_steps=2, progress=False)
    stored = study.array("circuit/trust")
    assert stored.shape == (3, len(TRUST_FIELDS))
    assert np.isnan(stored[1]).all()  # step 600 was not checked
    reports = trust_from_study(study)
    assert [r.step for r in reports] == [400, 1000]

    step = 1000
    model = load(study.manifest, step)
    fm = FunctionalModel(model)
    exact = score_patching(fm, study.task).mean(0, dtype=np.float64).astype(np.float32)
    independent = compare_scores(study.array_at(step, "circuit/scores"), exact, fm.spec.valid,
                                 study.array_at(step, "circuit/in_circuit"), step)
    np.testing.assert_allclose(stored[2], independent.to_array(), atol=1e-5, rtol=0)
    assert reports[-1] == independent or np.allclose(reports[-1].to_array(), independent.to_array(), atol=1e-5)
    lines = trust_text(reports, "eap-ig", 5)
    assert any(line.startswith("  step 1000: EAP-IG(5) vs exact: rho") for line in lines), lines
