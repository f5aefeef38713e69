"""The formation account as the app words it (app/formation.py, app/graph_view.py, app/charts.py),
on hand-made values: no study, no Streamlit."""

from __future__ import annotations

import numpy as np
import pytest

from app import charts, formation
from app import graph_view as gv
from circuits.discovery.trust import TrustReport
from circuits.tracking import CircuitSeries, Epoch, LeadingIndicators, Role, explanandum


def _explained():
    """Three steps: no effect (gap 0 +- 1), an effect whose circuit does not come back, a circuit."""
    clean = np.array([[1.0, -1.0, 1.0, -1.0], [2.0, 2.2, 1.8, 2.0], [5.0, 5.1, 4.9, 5.0]])
    return explanandum(clean, np.zeros_like(clean), reproducibility=np.array([0.9, 0.3, 0.95]))


def test_step_status_says_why_a_step_has_no_circuit():
    e = _explained()
    assert [bool(h) for h in e.has_circuit] == [False, False, True]
    has, line = formation.step_status(e, 0)
    assert not has
    assert line == "no circuit yet: gap 0 +- 0.58 (z 0.0, 0.0% of the largest gap), reproducibility 0.90; below the rule (|z| 0.0 < 3)"
    has, line = formation.step_status(e, 1)
    assert not has and line.startswith("no circuit yet: gap 2 +- ")
    assert line.endswith("below the rule (reproducibility 0.30 < 0.6)")
    has, line = formation.step_status(e, 2)
    assert has and line.startswith("a circuit to explain: gap 5 +- ") and "100.0% of the largest gap" in line
    assert formation.step_status(None, 0) == (True, "")  # no rule to apply: nothing said
    assert formation.rule_text(e) == "|z| >= 3, reproducibility >= 0.6"


def test_no_circuit_after_one_is_not_yet():
    e = _explained()
    e.has_circuit = np.array([True, False, True])
    assert formation.step_status(e, 1)[1].startswith("no circuit: ")


def _epochs() -> list[Epoch]:
    first = Epoch(0, 25, False, 3)
    second = Epoch(100, 400, True, 5, n_edges=2, similarity=0.8,
                   added=[{"edge": "input->a0.h0<v>", "mean_share": 0.4}, {"edge": "a0.h0->logits", "mean_share": 0.3}])
    third = Epoch(425, 1000, True, 4, n_edges=2, similarity=0.7,
                  added=[{"edge": "a0.h0->a1.h1<k>", "mean_share": 0.5}],
                  dropped=[{"edge": "input->a0.h0<v>", "mean_share": 0.4}])
    return [first, second, third]


def test_epoch_labels_rows_and_changes():
    epochs = _epochs()
    assert [formation.epoch_label(epochs, e) for e in epochs] == ["E1 no circuit yet", "E2 2 edges", "E3 +1 -1 edges"]
    assert formation.epoch_label([Epoch(0, 0, True, 1, 1), Epoch(5, 5, False, 1)], Epoch(5, 5, False, 1)) == "E2 no circuit"
    rows = formation.epoch_rows(epochs)
    assert [r["steps"] for r in rows] == ["steps 0-25", "steps 100-400", "steps 425-1000"]
    assert rows[0]["edges"] is None and rows[2]["added"] == 1 and rows[2]["dropped"] == 1
    changes = formation.change_rows(epochs[2])
    assert [(c["edge"], c["change"]) for c in changes] == [("a0.h0->a1.h1<k>", "added"), ("input->a0.h0<v>", "dropped")]
    assert formation.epoch_of(epochs, 50) is None and formation.epoch_of(epochs, 425) is epochs[2]


def test_step_rows_carry_share_and_epoch():
    e = _explained()
    rows = formation.step_rows([0, 100, 425], e, _epochs())
    assert [r["circuit"] for r in rows] == ["no", "no", "yes"]
    assert rows[2]["share of largest gap"] == pytest.approx(1.0) and rows[1]["share of largest gap"] == pytest.approx(0.4)
    assert [r["epoch"] for r in rows] == ["E1 no circuit yet", "E2 2 edges", "E3 +1 -1 edges"]


def test_leading_indicator_title_and_rows():
    x = LeadingIndicators("metric", "rise", 450, 400, 500, 425, [
        {"measure": "circuit/n_edges", "onset": 50, "done": 475, "still_moving": True, "lead_steps": 375,
         "lead_tokens": 792000}])
    assert formation.lead_title(x) == "metric rise at step 450 (window 400-500, own change from 425): 1 measure started earlier"
    assert formation.lead_rows(x) == [{"measure": "circuit/n_edges", "change from": 50, "done by": 475,
                                       "still moving at the target's start": True, "lead (steps)": 375,
                                       "lead (tokens)": 792000}]
    assert formation.lead_title(LeadingIndicators("metric", "rise", 1, 0, 2, 1)).endswith("no measure started earlier")


def test_role_text_with_and_without_the_stable_circuit():
    role = Role("induction", "a1.h1", 0.05, 0.8, 450, 425)
    assert formation.role_text(role) == "a1.h1 induction: 0.05 -> 0.8, formed at step 450 (after 425)"
    circuit = CircuitSeries(forward_names=[], backward_names=[], nodes=["a1.h1", "a0.h0"], n_edges=np.zeros(1),
                            n_nodes=np.zeros(1), faithfulness=np.zeros(1), jaccard_adjacent=np.zeros(1),
                            jaccard_final=np.zeros(1), weighted_jaccard_adjacent=np.zeros(1),
                            weighted_jaccard_final=np.zeros(1), edges_added=np.zeros(1), edges_removed=np.zeros(1),
                            node_emergence=np.array([400, -1]), edge_emergence=np.zeros((0, 0)),
                            in_circuit=np.zeros((1, 0, 0), dtype=bool))
    assert formation.role_text(role, circuit).endswith("; in the stable circuit from step 400")
    other = Role("previous_token", "a0.h0", 0.1, 0.6, None, None)
    assert formation.role_text(other, circuit) == ("a0.h0 previous token: 0.1 -> 0.6, formed at never for good; "
                                                   "not in the final stable circuit")


def test_trust_lines_are_the_librarys_wording():
    good = TrustReport(0.66, 0.94, 19 / 21, 21, 9, 25.0, False, 81, step=1000)
    lines = formation.trust_lines_at(good, {"method": "eap-ig", "ig_steps": 5})
    assert lines == ["step 1000: EAP-IG(5) vs exact: rho 0.66 signed, 0.94 on |score|, top-10 overlap 9/10, "
                     "top-21 (circuit) overlap 19/21, worst exact rank of a circuit edge 25 of 81"]
    poor = TrustReport(0.2, 0.5, 0.5, 10, 4, 60.0, True, 81, step=450)
    lines = formation.trust_lines_at(poor, {"method": "eap-ig", "ig_steps": 5})
    assert lines[0].endswith(" - POOR") and "--ig-steps 30" in lines[1] and "--method patching" in lines[1]
    assert formation.report_at([good, poor], 450) is poor and formation.report_at([good], 0) is None


def test_edges_carry_inclusion_and_se():
    forward, backward = ["input", "a0.h0"], ["a0.h0<q>", "a0.h0<k>", "a0.h0<v>", "logits"]
    scores = np.array([[0.5, -0.2, 0.1, np.nan], [np.nan, np.nan, np.nan, 1.0]])
    stable = np.array([[True, False, False, False], [False, False, False, True]])
    full = stable | np.array([[False, True, False, False], [False] * 4])
    inclusion = np.where(stable, 0.9, 0.5)
    se = np.full(scores.shape, 0.01)
    stats = formation.EdgeStats(inclusion, se)
    assert gv.select_edges(scores, full, "full").sum() == 3 and gv.select_edges(scores, stable, "circuit").sum() == 2
    view = gv.view(gv.layout(forward, backward), forward, backward, scores, stable, full, scores, None, stats, stats)
    by_id = {e["id"]: e for e in view["edges"]}
    assert by_id["a0.h0->logits"]["inclusion"] == 0.9 and by_id["a0.h0->logits"]["se"] == 0.01
    assert by_id["input->a0.h0<k>"]["status"] == "removed" and by_id["input->a0.h0<k>"]["inclusion"] == 0.5
    plain = gv.view(gv.layout(forward, backward), forward, backward, scores, stable)
    assert all(e["inclusion"] is None and e["se"] is None for e in plain["edges"])
    rows = gv.edge_rows(forward, backward, scores, full, stats, {"stable circuit": stable, "full-data circuit": full})
    assert [r["edge"] for r in rows] == ["a0.h0->logits", "input->a0.h0<q>", "input->a0.h0<k>"]  # strongest first
    assert [r["stable circuit"] for r in rows] == [True, True, False] and rows[2]["in resamples"] == 0.5
    assert gv.edge_rows(forward, backward, scores, full, formation.EdgeStats(None, None), {})[0]["+- se"] is None


def test_epoch_bands_meet_halfway_and_one_step_shows():
    assert charts.band_edges([0, 25, 100, 1000], [0, 100], [25, 1000]) == [(0.0, 62.5), (62.5, 1000.0)]
    assert charts.band_edges([7], [7], [7]) == [(6.5, 7.5)]
    e = _explained()
    fig = charts.formation_timeline([0, 100, 425], e.gap, e.gap_se, e.share, e.reproducibility, e.has_circuit,
                                    [("E1 <b>x</b>", False, 0, 100), ("E2 1 edges", True, 425, 425)], 0.6,
                                    checked=((425, True), (7, False)))
    labels = [a.text for a in fig.layout.annotations]
    assert "E1 &lt;b&gt;x&lt;/b&gt;" in labels and "E2 1 edges" in labels  # labels escaped
    assert [t.name for t in fig.data][:2] == ["has a circuit", "no circuit"] and list(fig.data[0].x) == [425]
    ring = next(t for t in fig.data if t.name.startswith("checked against exact patching"))
    assert list(ring.x) == [425] and list(ring.marker.color) == ["#b2182b"]  # poor in red; unknown steps left out
