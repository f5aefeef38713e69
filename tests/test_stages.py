"""Stage detection on curves with known turns and plateaus (circuits.stages), and the LLC lines of
the tracking (stages in the summary, against the circuit epochs, as a leading-indicator target)."""

from __future__ import annotations

import numpy as np
import pytest

from circuits.stages import find_stages, fit_knots, noise
from circuits.tracking import LEAD_TARGETS, Epoch, Tracking, llc_against_epochs, summary_text

STEPS = np.arange(0, 1000, 20)  # 50 checkpoints
IDX = np.arange(len(STEPS), dtype=float)
# rises to checkpoint 15 (step 300), level to 30 (600), falls to 40 (800), rises again to the end
TRUE = np.piecewise(IDX, [IDX < 15, (IDX >= 15) & (IDX < 30), (IDX >= 30) & (IDX < 40), IDX >= 40],
                    [lambda t: t, 15.0, lambda t: 15.0 - 0.8 * (t - 30), lambda t: 7.0 + (t - 40)])
TURNS = {300: "levels off", 600: "takes off", 800: "trough"}


def noisy(sd: float, seed: int = 0) -> np.ndarray:
    return TRUE + np.random.default_rng(seed).normal(0.0, sd, len(TRUE))


def test_boundaries_fall_at_the_known_turns_with_their_kinds():
    found = find_stages(noisy(0.3), STEPS, np.full(len(STEPS), 0.3))
    assert [(b.step, b.kind) for b in found.boundaries] == list(TURNS.items())
    assert [s.kind for s in found.stages] == ["rise", "plateau", "fall", "rise"]


def test_every_true_turn_lies_in_a_window_under_heavier_noise():
    # noise at 1/15 of the range: boundaries move and the windows (about 2 sigma) say by how much
    for seed in range(6):
        found = find_stages(noisy(1.0, seed), STEPS, np.full(len(STEPS), 1.0))
        for turn in TURNS:  # within one checkpoint (20 steps) of some boundary's window
            assert any(b.window_start - 20 <= turn <= b.window_end + 20 for b in found.boundaries), (seed, turn)


def test_windows_widen_as_the_noise_grows():
    def width(sd: float) -> int:
        found = find_stages(noisy(sd), STEPS, np.full(len(STEPS), sd))
        return sum(b.window_end - b.window_start for b in found.boundaries)

    assert width(0.05) <= width(1.0)
    assert width(1.0) > 0


def test_a_noisy_flat_curve_is_one_plateau_without_boundaries():
    flat = 5.0 + np.random.default_rng(1).normal(0.0, 0.5, len(STEPS))
    found = find_stages(flat, STEPS, np.full(len(STEPS), 0.5))
    assert [s.kind for s in found.stages] == ["plateau"]
    assert found.boundaries == []


def test_a_peak_is_a_rise_then_a_fall():
    tent = np.where(IDX < 25, IDX, 50.0 - IDX) + np.random.default_rng(2).normal(0.0, 0.2, len(IDX))
    found = find_stages(tent, STEPS, np.full(len(IDX), 0.2))
    assert [(b.step, b.kind) for b in found.boundaries] == [(500, "peak")]


def test_noise_is_the_larger_of_the_standard_error_and_the_curve_scatter():
    y = noisy(0.5)
    scatter = noise(y)  # no standard error: the second-difference scatter alone
    assert np.allclose(scatter, scatter[0]) and 0.2 < scatter[0] < 1.0
    assert np.allclose(noise(y, np.full(len(y), 3.0)), 3.0)
    assert np.allclose(noise(y, np.full(len(y), 1e-6)), scatter)


def test_the_fit_is_least_squares_over_the_hinge_basis():
    y, sigma = noisy(0.3), np.full(len(STEPS), 0.3)
    fit, chi2 = fit_knots(y, sigma, [15, 30])
    x = np.column_stack([np.ones(len(IDX)), IDX, np.maximum(0, IDX - 15), np.maximum(0, IDX - 30)])
    expected = x @ np.linalg.lstsq(x, y, rcond=None)[0]  # equal weights: ordinary least squares
    assert np.allclose(fit, expected)
    assert chi2 == pytest.approx((((y - expected) / 0.3) ** 2).sum())


def _tracking(epochs: list[Epoch]) -> Tracking:
    found = find_stages(noisy(0.3), STEPS, np.full(len(STEPS), 0.3))
    return Tracking(run="synthetic", steps=STEPS, curves={"llc": noisy(0.3)}, heads={}, circuit=None, phases=[],
                    stability={}, epochs=epochs, llc_stages=found)


def test_summary_says_which_llc_boundaries_meet_a_circuit_epoch_with_the_steps():
    epochs = [Epoch(0, 280, False, 15), Epoch(300, 580, True, 15, 3, 0.8), Epoch(600, 980, True, 20, 4, 0.7)]
    tracking = _tracking(epochs)
    compared = {c["step"]: c for c in llc_against_epochs(tracking)}
    assert compared[300]["epoch_starts"] == [300]
    assert compared[600]["epoch_starts"] == [600]
    assert compared[800]["epoch_starts"] == [] and compared[800]["nearest_epoch_start"] == 600
    text = summary_text(tracking)
    assert "boundary at step 300 (levels off: rise -> plateau), window 300-3" in text
    assert "coincides with the circuit epoch starting at 300" in text
    assert "boundary at step 800 (trough: fall -> rise)" in text and "nearest: 600, 200 steps away" in text


def test_summary_says_when_there_are_no_epochs_to_compare_with():
    assert "no circuit epochs to compare with" in summary_text(_tracking([]))


def test_stages_are_in_the_tracking_json():
    data = _tracking([]).to_dict()
    assert [b["step"] for b in data["llc_stages"]["boundaries"]] == list(TURNS)
    assert len(data["llc_stages"]["fit"]) == len(STEPS)


def test_the_llc_curve_is_a_leading_indicator_target():
    assert "llc" in LEAD_TARGETS


def test_a_slow_climb_then_a_steep_one_is_two_stages():
    ramp = np.where(IDX < 20, 0.2 * IDX, 4.0 + 2.0 * (IDX - 20)) + np.random.default_rng(3).normal(0.0, 0.2, len(IDX))
    found = find_stages(ramp, STEPS, np.full(len(IDX), 0.2))
    assert [(b.step, b.kind) for b in found.boundaries] == [(400, "steepens")]
    assert [s.kind for s in found.stages] == ["rise", "rise"]
