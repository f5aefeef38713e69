"""Progress measures: Fourier helpers on hand-built embeddings, ICL score, and a grokking run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from circuits.progress import (
    embed_freq_norms,
    fourier_basis,
    key_share,
    progress_analysis,
    restricted_and_excluded,
    sum_directions,
    top_freqs,
)


def _ctx(run_dir, step, **options):
    import circuits
    from circuits.manifest import load_manifest
    from circuits.tasks import induction_task
    from circuits.visit import VisitContext

    manifest = load_manifest(run_dir)
    return VisitContext(circuits.load(manifest, step), induction_task(4), manifest, step, options=options)


def test_fourier_basis_is_orthonormal():
    basis = fourier_basis(7)
    torch.testing.assert_close(basis @ basis.T, torch.eye(7, dtype=torch.float64))


def test_embed_freq_norms_pick_planted_frequencies():
    p, d = 13, 8
    x = torch.arange(p, dtype=torch.float64)
    W = torch.zeros(p, d, dtype=torch.float64)
    W[:, 0] = 3 * torch.cos(2 * math.pi * 2 * x / p)
    W[:, 1] = 2 * torch.sin(2 * math.pi * 5 * x / p)
    W[:, 2] = 0.1 * torch.cos(2 * math.pi * 6 * x / p)
    norms = embed_freq_norms(W)
    assert norms.shape == (6,)
    assert top_freqs(norms, 2).tolist() == [2, 5]
    assert key_share(norms, np.array([2, 5])) == pytest.approx((9 + 4) / (9 + 4 + 0.01), rel=1e-6)


def test_restricted_and_excluded_split_the_logits():
    p = 7
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))
    answers = (pairs[:, 0] + pairs[:, 1]) % p
    c = torch.arange(p, dtype=torch.float64)
    s = (pairs[:, 0] + pairs[:, 1]).double()[:, None]
    # Logits built from frequency 2 only: cos(w(a+b-c)), the algorithm of Nanda et al.
    logits = 5 * torch.cos(2 * math.pi * 2 * (s - c) / p)
    train = torch.arange(0, p * p, 2)
    restricted, excluded = restricted_and_excluded(logits, answers, train, p, np.array([2]))
    full = torch.nn.functional.cross_entropy(logits, answers).item()
    assert restricted == pytest.approx(full, abs=1e-9)  # nothing outside the key frequency
    assert excluded == pytest.approx(math.log(p), abs=1e-9)  # nothing left: uniform
    dirs = sum_directions(p, np.array([1, 2]))
    torch.testing.assert_close(dirs @ dirs.T, torch.eye(4, dtype=torch.float64))


def test_icl_score_on_the_induction_run(induction_run):
    from circuits.manifest import load_manifest

    steps = load_manifest(induction_run).steps
    start = progress_analysis(_ctx(induction_run, steps[0]))
    end = progress_analysis(_ctx(induction_run, steps[-1]))
    assert set(end) == {"early_loss", "late_loss", "icl_score", "loss_by_position"}
    assert end["loss_by_position"].shape == (32,)
    assert abs(start["icl_score"]) < 0.3
    assert end["icl_score"] < -2.0
    assert end["early_loss"] > 3.5


@pytest.fixture(scope="module")
def grok_series(grokking_run):
    """The measures over the grokking run's first 1000 steps (memorised by ~100, test accuracy ~0.9 at 1000)."""
    import circuits
    from circuits.manifest import load_manifest
    from circuits.progress import model_freq_norms

    manifest = load_manifest(grokking_run)
    # The run's key frequencies, as the run-end pass takes them: the final checkpoint's top 5.
    keys = top_freqs(model_freq_norms(circuits.load(manifest, manifest.steps[-1]), 31), 5).tolist()
    steps = [step for step in manifest.steps if step <= 1000]
    rows = [progress_analysis(_ctx(grokking_run, step, key_freqs=keys)) for step in steps]
    series = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return np.array(steps), series


def _first_below(curve, steps, level):
    return int(steps[np.argmax(curve < level)]) if (curve < level).any() else None


@pytest.mark.xdist_group("grokking")  # one worker: the grokking run is trained once
def test_grokking_key_frequencies_dominate(grok_series):
    steps, s = grok_series
    keys = s["key_freqs"][-1]
    assert (s["key_freqs"] == keys).all()  # one set for the whole run
    assert s["key_share"][-1] > 0.6  # 5 of 15 frequencies: a third of the norm at random
    assert s["key_share"][-1] > 1.5 * s["key_share"][0]
    assert s["train_acc"][-1] == 1.0 and s["test_acc"][-1] > 0.85


@pytest.mark.xdist_group("grokking")  # one worker: the grokking run is trained once
def test_grokking_restricted_loss_falls_before_test_loss(grok_series):
    steps, s = grok_series
    level = 1.0
    restricted_at = _first_below(s["restricted_loss"], steps, level)
    test_at = _first_below(s["test_loss"], steps, level)
    assert restricted_at is not None and test_at is not None
    assert restricted_at < test_at


@pytest.mark.xdist_group("grokking")  # one worker: the grokking run is trained once
def test_grokking_excluded_loss_rises_while_test_loss_falls(grok_series):
    steps, s = grok_series
    memorised = int(np.argmax(s["train_acc"] > 0.99))
    excluded, test = s["excluded_loss"][memorised:], s["test_loss"][memorised:]
    assert test[-1] < test[0] - 1.0
    assert excluded[-1] > excluded[0] + 1.0
    assert np.corrcoef(excluded, test)[0, 1] < -0.8


@pytest.mark.xdist_group("grokking")  # one worker: the grokking run is trained once
def test_grokking_phase_change_after_memorisation(grok_series):
    from circuits.tracking import change_points

    steps, s = grok_series
    memorise = change_points(s["train_loss"], steps, name="train_loss")
    grok = change_points(s["test_loss"], steps, name="test_loss")
    assert memorise and memorise[0].direction == "fall"
    falls = [cp for cp in grok if cp.direction == "fall"]
    assert falls, grok
    assert falls[-1].step > memorise[0].end_step


@pytest.mark.xdist_group("grokking")  # one worker: the grokking run is trained once
def test_grokking_measures_match_the_recipes_evaluation(grokking_run, grok_series):
    from circuits.recipes.common import read_history

    steps, s = grok_series
    history = {row["step"]: row for row in read_history(grokking_run)}
    for i, step in enumerate(steps):
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert s[key][i] == pytest.approx(history[int(step)][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def grok_tracking(grokking_run, tmp_path_factory):
    """``track`` of a sweep of the grokking run (head detectors and progress measures, no circuit)."""
    from circuits.sweep import sweep
    from circuits.tracking import track

    study = sweep(grokking_run, "modular-addition", tmp_path_factory.mktemp("grok") / "study", hooks="none",
                  progress=False)
    return track(study)


@pytest.mark.xdist_group("grokking")  # one worker: the grokking run is trained once
def test_grokking_restricted_loss_leads_the_test_loss_fall(grok_tracking):
    falls = [x for x in grok_tracking.leading if x.target == "progress/test_loss" and x.direction == "fall"]
    assert falls, grok_tracking.to_dict()["leading_indicators"]
    leads = {ind["measure"]: ind for ind in falls[-1].indicators}
    assert "progress/restricted_loss" in leads, leads
    restricted = leads["progress/restricted_loss"]
    assert restricted["lead_steps"] > 0 and restricted["onset"] < falls[-1].onset
    assert restricted["lead_tokens"] is None or restricted["lead_tokens"] > 0
    assert "leading_indicators" in grok_tracking.to_dict()
