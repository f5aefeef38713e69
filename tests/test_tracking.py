"""Cross-step tracking on hand-built circuits with known answers, and change-point detection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from circuits.errors import CircuitsError
from circuits.tracking import (
    adjacent,
    against_final,
    change_points,
    circuit_series,
    edit_distance,
    emergence_steps,
    jaccard,
    leading_indicators,
    mechanism_epochs,
    node_masks,
    onset,
    segment_similar,
    track,
    weighted_jaccard,
)

STEPS = np.array([0, 10, 20, 30, 40])
# Four edges e0..e3 over five steps (rows: steps).
MASKS = np.array([
    [1, 0, 0, 1],
    [1, 1, 0, 0],
    [1, 1, 1, 0],
    [0, 1, 1, 0],
    [1, 1, 1, 0],
], dtype=bool)


def test_jaccard_known_values():
    assert jaccard(MASKS[0], MASKS[1]) == pytest.approx(1 / 3)
    assert jaccard(MASKS[1], MASKS[2]) == pytest.approx(2 / 3)
    assert jaccard(MASKS[2], MASKS[4]) == 1.0
    assert jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert jaccard(np.array([1, 0]), np.array([0, 1])) == 0.0


def test_weighted_jaccard_known_values():
    a, b = np.array([1.0, 2.0, 0.0]), np.array([1.0, 1.0, 3.0])
    assert weighted_jaccard(a, b) == pytest.approx((1 + 1 + 0) / (1 + 2 + 3))
    assert weighted_jaccard(-a, b) == pytest.approx(2 / 6)  # magnitudes
    assert weighted_jaccard(np.zeros(2), np.zeros(2)) == 1.0
    # On 0/1 weights it is the plain Jaccard.
    assert weighted_jaccard(MASKS[0].astype(float), MASKS[1].astype(float)) == pytest.approx(1 / 3)


def test_edit_distance_known_values():
    assert edit_distance(MASKS[0], MASKS[1]) == (1, 1)  # +e1, -e3
    assert edit_distance(MASKS[2], MASKS[3]) == (0, 1)  # -e0
    assert edit_distance(MASKS[3], MASKS[4]) == (1, 0)
    assert edit_distance(MASKS[4], MASKS[4]) == (0, 0)


def test_emergence_steps_known_values():
    # e0 leaves at 30 and returns at 40: emerges (for good) at 40; e1 from 10; e2 from 20; e3 never.
    assert emergence_steps(MASKS, STEPS).tolist() == [40, 10, 20, -1]
    # Works on any shape per step (e.g. a [writer, reader] matrix).
    grid = MASKS.reshape(5, 2, 2)
    assert emergence_steps(grid, STEPS).tolist() == [[40, 10], [20, -1]]
    with pytest.raises(ValueError, match="5 masks but 4 steps"):
        emergence_steps(MASKS, STEPS[:4])


def test_adjacent_and_final_series():
    adj = adjacent(jaccard, MASKS)
    assert np.isnan(adj[0])
    np.testing.assert_allclose(adj[1:], [1 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(against_final(jaccard, MASKS), [1 / 4, 2 / 3, 1, 2 / 3, 1])


def test_node_masks_and_circuit_series():
    forward = ["input", "a0.h0", "a0.h1"]
    backward = ["a0.h0<q>", "a0.h1<k>", "logits"]
    # Step 0: input->a0.h0<q>. Step 1: + a0.h0->logits. Step 2: a0.h1->logits only.
    masks = np.zeros((3, 3, 3), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, 0] = masks[1, 1, 2] = True
    masks[2, 2, 2] = True
    nodes, node_in = node_masks(masks, forward, backward)
    assert nodes == ["input", "a0.h0", "a0.h1", "logits"]
    assert node_in.tolist() == [[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1]]
    scores = masks * 2.0
    series = circuit_series(np.array([0, 5, 9]), scores, masks, forward, backward)
    assert series.n_edges.tolist() == [1, 2, 1]
    assert series.n_nodes.tolist() == [2, 3, 2]
    assert series.edges_added.tolist() == [0, 1, 1]
    assert series.edges_removed.tolist() == [0, 0, 2]
    assert series.emergence_order() == [("logits", 5), ("a0.h1", 9)]
    assert series.edge_emergence_order() == [("a0.h1->logits", 9)]
    np.testing.assert_allclose(series.jaccard_final, [0, 0, 1])


def _sigmoid_steps():
    steps = np.r_[0, 1, 2, 4, 8, 16, 32, 64, np.arange(75, 601, 15)]
    return steps


def test_change_point_found_in_sigmoid():
    steps = _sigmoid_steps()
    rng = np.random.default_rng(0)
    loss = 4.1 - 3.9 / (1 + np.exp(-(steps - 300) / 15)) + rng.normal(0, 0.03, len(steps))
    found = change_points(loss, steps, name="loss")
    assert len(found) == 1
    cp = found[0]
    assert cp.direction == "fall" and cp.curve == "loss"
    assert cp.start_step <= 300 <= cp.end_step
    assert 270 <= cp.step <= 330
    assert cp.end_step - cp.start_step <= 120
    assert cp.before > 3.5 and cp.after < 1.0


def test_change_points_on_flat_and_short_curves():
    steps = _sigmoid_steps()
    rng = np.random.default_rng(1)
    assert change_points(np.full(len(steps), 2.0), steps) == []
    assert change_points(np.array([1.0, 0.0, 1.0]), np.array([0, 1, 2])) == []
    noise = 1.0 + rng.normal(0, 0.01, len(steps))
    assert len(change_points(noise, steps)) <= 1  # pure noise: at most one spurious segment


def test_two_phases_found_in_order():
    steps = np.arange(0, 1000, 10)
    curve = 1 / (1 + np.exp(-(steps - 250) / 10)) + 1 / (1 + np.exp(-(steps - 700) / 10))
    found = change_points(curve, steps, name="acc")
    assert [cp.direction for cp in found] == ["rise", "rise"]
    assert found[0].start_step <= 250 <= found[0].end_step
    assert found[1].start_step <= 700 <= found[1].end_step


class FakeStudy:
    """The Study read API on in-memory arrays."""

    def __init__(self):
        self.steps = list(_sigmoid_steps())
        steps = np.asarray(self.steps)
        n = len(steps)
        self.n_layers, self.n_heads = 1, 2
        self.manifest = type("M", (), {"name": "fake-run"})()
        rise = 1 / (1 + np.exp(-(steps - 300) / 15))
        self._metric = 0.1 + 5 * rise
        heads = np.zeros((n, 1, 2))
        heads[:, 0, 1] = 0.05 + 0.85 * rise
        # Graph: 1 layer, 2 heads, with MLP: forward input, a0.h0, a0.h1, m0.
        from circuits.graph import GraphSpec

        spec = GraphSpec(1, 2)
        masks = np.zeros((n, spec.n_forward, spec.n_backward), dtype=bool)
        masks[:, 0, spec.backward_names.index("logits")] = True  # input -> logits always
        late = steps >= 300
        masks[late, spec.forward_names.index("a0.h1"), spec.backward_names.index("logits")] = True
        masks[late, 0, spec.backward_names.index("a0.h1<v>")] = True
        self.provenance = {}
        self.graph_spec = spec
        self._arrays = {
            "heads/induction": heads.astype(np.float32),
            "progress/icl_score": -4 * rise,
            "circuit/in_circuit": masks,
            "circuit/scores": masks * 1.5,
            "circuit/faithfulness": 0.5 + 0.4 * rise,
        }

    def metric(self):
        return self._metric

    def loss(self):
        return 4.0 - 3.5 * (self._metric - 0.1) / 5

    def has(self, key):
        return key in self._arrays

    def keys(self, prefix=None):
        return [k for k in self._arrays if prefix is None or k.startswith(prefix + "/")]

    def array(self, key):
        return self._arrays[key]

    def array_at(self, step, key):
        return self._arrays[key][self.steps.index(step)]


def test_track_aligns_phases_with_circuit_changes():
    tracking = track(FakeStudy())
    metric_phases = tracking.phases_of("metric")
    assert len(metric_phases) == 1
    phase = metric_phases[0]
    assert phase.direction == "rise" and phase.start_step <= 300 <= phase.end_step
    assert phase.circuit["edges_added"] == 2
    assert "a0.h1" in phase.circuit["nodes_emerged"]
    assert tracking.phases_of("heads/induction/a0.h1")
    assert tracking.top_head("induction") == (0, 1)
    c = tracking.circuit
    assert c.emergence_order()[0] == ("input", 0)
    assert dict(c.emergence_order())["a0.h1"] == 300
    assert tracking.stability["mean_jaccard_adjacent"] == 1.0
    data = tracking.to_dict()
    text = json.dumps(data)  # JSON-able, NaN written as null
    assert "NaN" not in text
    assert data["schema"] == "circuits.tracking/1"
    assert data["circuit"]["jaccard_adjacent"][0] is None
    assert data["heads"]["induction"]["top_head"] == "a0.h1"
    assert data["heads"]["induction"]["circuit_emergence"] == 300
    assert {"node": "a0.h1", "step": 300, "after_step": 285} in data["circuit"]["node_emergence"]


def test_summary_and_figures(tmp_path):
    from circuits.figures import all_figures, write_figures
    from circuits.tracking import summary_text

    tracking = track(FakeStudy())
    text = summary_text(tracking)
    assert "phase changes" in text and "metric: rise" in text
    assert "a0.h1 @300" in text
    figures = all_figures(tracking)
    assert set(figures) == {"curves", "heads_induction", "heatmap_induction", "circuit"}
    heatmap = figures["heatmap_induction"].data[0]
    assert list(heatmap.y) == ["a0.h0", "a0.h1"] and len(heatmap.x) == len(tracking.steps)
    written = write_figures(tracking, None, tmp_path / "figs")
    assert len(written["html"]) == 4
    assert all((tmp_path / "figs" / f"{name}.html").exists() for name in figures)
    assert written["png"] or written["notes"]  # PNG, or a note saying why not


def test_summary_command_on_a_swept_run(induction_run, tmp_path):
    """sweep with the heads and progress analyses, then `circuits summary` (text, JSON, figures)."""
    from typer.testing import CliRunner

    from circuits.cli import app
    from circuits.detectors import head_analysis
    from circuits.progress import progress_analysis
    from circuits.sweep import sweep

    study = tmp_path / "study"
    sweep(induction_run, "induction", study, steps="0,300,400,425,450,475,500,600,1000", hooks="none",
          n_examples=4, analyses=[("heads", head_analysis), ("progress", progress_analysis)], progress=False,
          options={"heads_n_examples": 8, "progress_n_examples": 16})
    runner = CliRunner()
    text = runner.invoke(app, ["summary", str(study)])
    assert text.exit_code == 0, text.output
    assert "phase changes" in text.output and "induction" in text.output
    result = runner.invoke(app, ["summary", str(study), "--json", "--figures", str(tmp_path / "figs"), "--no-png"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == [0, 300, 400, 425, 450, 475, 500, 600, 1000]
    assert data["circuit"] is None
    icl = [p for p in data["phases"] if p["curve"] == "progress/icl_score"]
    assert icl and icl[0]["direction"] == "fall" and 300 <= icl[0]["step"] <= 600
    top = data["heads"]["induction"]["top_head"]
    curve = data["heads"]["induction"]["top_head_curve"]
    assert curve[0] < 0.2 and curve[-1] > 0.5
    assert any(p["curve"] == f"heads/induction/{top}" for p in data["phases"])
    assert (tmp_path / "figs" / "heatmap_induction.html").exists()


def test_curves_of_a_long_run_read_on_a_log_axis_with_every_label_in_range(monkeypatch):
    """Log-then-linear schedules get a log step axis; plotly reads annotations there in log10
    units, so a phase label placed at its step would stretch the axis to ~10^300."""
    import math
    import sys

    from circuits.figures import metric_curves
    from circuits.steps import log_then_linear

    monkeypatch.setattr(sys.modules[__name__], "_sigmoid_steps", lambda: np.array(log_then_linear(20000, 1000)))
    fig = metric_curves(track(FakeStudy()), step=300)
    assert fig.layout.xaxis.type == "log"
    labels = [a for a in fig.layout.annotations if a.xref and a.xref.startswith("x")]
    assert labels and all(a.text for a in labels)
    assert all(0 <= a.x <= math.log10(20000) for a in labels)
    assert all(1 <= s.x0 <= s.x1 <= 20000 for s in fig.layout.shapes)


# ---------------------------------------------------------------- mechanism epochs

EDGES = ["input->a0.h0<v>", "a0.h0->logits", "a0.h0->a1.h0<k>", "a1.h0->logits"]


def _two_mechanisms(n_none=2, n_first=4, n_second=5):
    """No circuit, then edges 0-1 (shares 0.5, 0.4), then edges 1-3 (0.2, 0.3, 0.5)."""
    first = np.array([0.5, 0.4, 0.0, 0.0])
    second = np.array([0.0, 0.2, 0.3, 0.5])
    rows = [np.zeros(4)] * n_none + [first] * n_first + [second] * n_second
    shares = np.array(rows) + 0.01  # a little of everything, outside the circuits
    masks = np.array([r > 0.05 for r in rows])
    steps = np.arange(len(rows)) * 10
    return steps, shares, masks


def test_two_different_circuits_make_two_epochs_after_a_no_circuit_epoch():
    steps, shares, masks = _two_mechanisms()
    epochs = mechanism_epochs(shares, masks, steps, EDGES)
    assert [(e.start, e.end, e.has_circuit) for e in epochs] == [(0, 10, False), (20, 50, True), (60, 100, True)]
    first, second = epochs[1], epochs[2]
    assert [e["edge"] for e in first.added] == ["input->a0.h0<v>", "a0.h0->logits"]  # strongest first
    assert first.dropped == []
    assert [e["edge"] for e in second.added] == ["a1.h0->logits", "a0.h0->a1.h0<k>"]
    assert second.added[0]["mean_share"] == pytest.approx(0.51)
    assert [e["edge"] for e in second.dropped] == ["input->a0.h0<v>"]
    assert second.dropped[0]["mean_share"] == pytest.approx(0.51)  # its share in the epoch before
    assert second.n_edges == 3 and second.similarity == pytest.approx(1.0)


def test_a_circuit_that_only_strengthens_stays_one_epoch():
    steps = np.arange(6) * 100
    shares = np.outer(np.linspace(0.5, 1.0, 6), [0.6, 0.4, 0.2])
    masks = np.ones_like(shares, dtype=bool)
    epochs = mechanism_epochs(shares, masks, steps, EDGES[:3])
    assert [(e.start, e.end, e.has_circuit) for e in epochs] == [(0, 500, True)]


def test_segment_similar_is_the_fewest_segments_at_the_cut():
    rows = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [0, 1]], dtype=float)
    assert segment_similar(rows, 0.6) == [(0, 2), (2, 5)]
    assert segment_similar(rows, 0.01) == [(0, 5)]  # everything overlaps a little with the mean
    with pytest.raises(CircuitsError, match=r"epoch similarity 0.0: expected a weighted Jaccard in \(0, 1\]"):
        mechanism_epochs(rows, rows > 0, np.arange(5), ["a->b", "c->d"], similarity=0.0)


# ---------------------------------------------------------------- leading indicators


def test_onset_measures_from_the_farthest_point():
    rise_then_fall = np.array([3.0, 5.0, 5.0, 4.5, 2.0, 0.0, 0.0])  # test loss while memorising, then grokking
    start, done = onset(rise_then_fall)
    assert start == 3  # 4.5 is > 10% of the way down from the peak (5.0 -> 0.0)
    assert done == 5
    assert onset(np.ones(5)) is None
    assert onset(np.array([0.0, 0.01, 0.0]), min_move=0.1) is None


def test_a_curve_that_moves_first_leads_the_targets_phase_change():
    steps = np.arange(0, 1100, 100)
    target = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 0.5, 0.1, 0.0, 0.0])  # falls from 500-600 on
    early = np.array([3.0, 3.0, 2.6, 2.4, 1.8, 1.2, 0.6, 0.2, 0.0, 0.0, 0.0])  # from 200
    done_long_ago = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # finished at 100
    late = np.array([0.0] * 8 + [1.0, 1.0, 1.0])  # after the target
    curves = {"test_loss": target, "restricted": early, "done": done_long_ago, "late": late}
    phases = change_points(target, steps, name="test_loss")
    assert phases
    (lead,) = leading_indicators("test_loss", phases, curves, steps, tokens=steps * 1000)
    assert lead.onset == 600
    assert [x["measure"] for x in lead.indicators] == ["done", "restricted"]  # by lead; "late" follows
    done, restricted = lead.indicators
    assert done["onset"] == 100 and done["done"] == 100 and not done["still_moving"]
    assert restricted["onset"] == 200 and restricted["still_moving"]
    assert restricted["lead_steps"] == 400 and restricted["lead_tokens"] == 400_000
    (no_tokens,) = leading_indicators("test_loss", phases, curves, steps)
    assert no_tokens.indicators[1]["lead_tokens"] is None


def _segments_by_hand(weights, similarity):
    """The epoch segmentation written as the plain double loop (each segment's mean computed directly)."""
    n = len(weights)
    best = [(0, 0.0, -1)] + [(n + 1, 0.0, -1)] * n
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            rows, mean = weights[i:j], weights[i:j].mean(0)
            top = np.maximum(rows, mean).sum(1)
            sim = np.where(top > 0, np.minimum(rows, mean).sum(1) / np.where(top > 0, top, 1.0), 1.0)
            if sim.min() < similarity:
                continue
            count, total = best[i][0] + 1, best[i][1] + float(sim.sum())
            if count < best[j][0] or (count == best[j][0] and total > best[j][1]):
                best[j] = (count, total, i)
    out, j = [], n
    while j > 0:
        out.append((best[j][2], j))
        j = best[j][2]
    return out[::-1]


def test_epoch_segmentation_equals_the_plain_double_loop_on_random_stacks():
    from circuits.tracking import segment_similar

    rng = np.random.default_rng(1)
    for _ in range(100):
        n, d = int(rng.integers(1, 25)), int(rng.integers(1, 10))
        base = np.abs(rng.normal(size=(3, d)))
        weights = np.repeat(base, [n // 3, n // 3, n - 2 * (n // 3)], axis=0) + 0.3 * np.abs(rng.normal(size=(n, d)))
        weights *= rng.random((n, d)) > 0.2
        similarity = float(rng.choice([0.5, 0.6, 0.8]))
        assert segment_similar(weights, similarity) == _segments_by_hand(weights, similarity)


def test_a_study_with_no_step_landed_is_refused_in_one_line(tmp_path):
    """A sweep (or a follower) that has written study.json but no shard yet: track, and so
    ``circuits summary``, refuse it naming the folder, instead of failing on an empty step list."""
    from types import SimpleNamespace

    from circuits.tracking import track

    with pytest.raises(CircuitsError) as refused:
        track(SimpleNamespace(steps=[], path=tmp_path / "study"))
    assert str(refused.value) == (f"{tmp_path / 'study'}: no step has landed yet (no complete shard in its shards/ "
                                  "folder); run the sweep, or wait for the follower to visit the first checkpoint")
