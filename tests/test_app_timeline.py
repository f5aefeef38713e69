"""The Formation page's timeline on hand-made values (app/formation.py lanes and clicks,
app/charts.py figures): no study, no Streamlit."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app import charts, formation
from circuits.tracking import ChangePoint, Epoch, LeadingIndicators, Tracking

STEPS = [0, 100, 200, 400, 450, 500, 1000]


def _phase(curve: str, step: int, start: int, end: int, direction: str = "fall") -> ChangePoint:
    return ChangePoint(curve, step, start, end, before=1.0, after=0.0, share=1.0, direction=direction)


def _tracking(**extra) -> Tracking:
    phases = [_phase("progress/early_loss", 100, 0, 200), _phase("loss", 450, 400, 500),
              _phase("metric", 450, 400, 500, "rise"), _phase("heads/induction/a1.h1", 500, 400, 1000, "rise")]
    epochs = [Epoch(0, 200, False, 3), Epoch(400, 1000, True, 4, n_edges=12)]
    leading = [LeadingIndicators("metric", "rise", 450, 400, 500, 425)]
    return Tracking(run="r", steps=np.array(STEPS), curves={}, heads={}, circuit=None, phases=phases,
                    stability={}, epochs=epochs, leading=leading, **extra)


def test_every_curves_phases_get_a_lane_metric_and_loss_first_then_the_epochs():
    lanes = formation.lanes(_tracking())
    assert [lane.name for lane in lanes] == ["metric phases", "loss phases", "early loss phases",
                                             "induction a1.h1 phases", "mechanism epochs"]
    assert lanes[2].spans == (formation.Span("fall", 0, 200, 100),)  # early_loss: its window, its step
    assert lanes[-1].spans == (formation.Span("E1 no circuit yet", 0, 200, 0), formation.Span("E2 12 edges", 400, 1000, 400))


def test_leading_indicators_are_not_a_lane_they_restate_the_targets_phases():
    assert all("leading" not in lane.name for lane in formation.lanes(_tracking()))


@dataclass
class Stage:
    start_step: int
    end_step: int
    label: str


@dataclass
class WithStages(Tracking):
    """A tracking result with one more list of windows (a measure added to tracking later)."""

    other_stages: list = field(default_factory=list)


def test_a_new_list_of_windows_in_the_tracking_result_becomes_a_lane_by_itself():
    tracked = WithStages(**vars(_tracking()), other_stages=[Stage(0, 350, "plateau"), Stage(350, 1000, "turn")])
    lanes = formation.lanes(tracked)
    assert lanes[-1] == formation.Lane("other stages", (formation.Span("plateau", 0, 350, 0),
                                                        formation.Span("turn", 350, 1000, 350)))


def test_a_click_goes_to_the_step_the_clicked_point_stands_for():
    targets = [[0, 100, 200], None, [450, 450]]
    assert formation.clicked_step([{"curve_number": 2, "point_index": 1}], targets) == 450
    assert formation.clicked_step([{"curve_number": 0, "point_number": 2}], targets) == 200
    assert formation.clicked_step([{"curve_number": 1, "point_index": 0}], targets) is None  # not clickable
    assert formation.clicked_step([{"curve_number": 7, "point_index": 0}], targets) is None
    assert formation.clicked_step([], targets) is None


def _figure(log: bool = False, step: int | None = 450):
    rows = [charts.Row("task metric", np.linspace(0, 8, len(STEPS)), ((400, 500),)),
            charts.Row("faithfulness", np.array([np.nan, 0.8, 0.82, 0.84, 0.845, 0.83, 0.81]),
                       y_range=charts.honest_range(np.array([0.8, 0.845])))]
    return charts.timeline(STEPS, rows, formation.lanes(_tracking()), step, log)


def test_timeline_targets_name_each_traces_clickable_steps():
    fig, targets = _figure()
    assert len(targets) == len(fig.data)
    bars = [(t.y[0], target) for t, target in zip(fig.data, targets, strict=True) if t.type == "bar"]
    assert bars == [("metric phases", [450]), ("loss phases", [450]), ("early loss phases", [100]),
                    ("induction a1.h1 phases", [500]), ("mechanism epochs", [0, 400])]
    curves = [target for t, target in zip(fig.data, targets, strict=True) if t.type == "scatter"]
    assert curves == [STEPS, STEPS]  # a curve's point stands for its own step


def test_timeline_bars_span_their_windows_on_a_linear_axis():
    fig, _ = _figure()
    epochs = next(t for t in fig.data if t.type == "bar" and t.y[0] == "mechanism epochs")
    assert list(epochs.base) == [0, 400] and list(epochs.x) == [200, 600]
    assert fig.layout.xaxis.type in (None, "linear") and fig.layout.showlegend is False


def test_timeline_marks_the_step_and_shades_each_curves_windows():
    fig, _ = _figure(step=450)
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert [(s.x0, s.x1, s.yref, s.y0, s.y1) for s in lines] == [(450, 450, "paper", 0, 1)]  # through every row
    shaded = [(s.x0, s.x1) for s in fig.layout.shapes if s.type == "rect"]
    assert shaded == [(400, 500)]  # the metric row's window; faithfulness has none


def test_log_axis_labels_powers_of_ten_and_puts_step_0_at_half_the_first_positive_step():
    fig, _ = _figure(log=True)
    bottom = [a for a in fig.select_xaxes() if a.type == "log"]
    assert bottom and all(a.dtick == 1 for a in bottom)
    assert fig.data[0].x[0] == 50  # step 0 (first positive step 100)
    assert list(fig.data[0].customdata)[0] == 0  # and hovering says step 0


def test_a_share_is_read_against_0_and_1_not_zoomed_into_its_noise():
    assert charts.honest_range(np.array([0.8, 0.845])) == (0.0, 1.05)
    lo, hi = charts.honest_range(np.array([-0.2, 1.3]))
    assert lo < -0.2 and hi > 1.3  # values outside [0, 1] stay in view
    assert charts.honest_range(np.array([np.nan])) == (0.0, 1.05)


def test_each_row_of_a_stacked_figure_gets_its_own_legend():
    fig = make_subplots(rows=3, cols=1)
    for row in (1, 2, 3):
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], name=f"a{row}"), row=row, col=1)
        fig.add_trace(go.Scatter(x=[0, 1], y=[1, 0], name=f"b{row}"), row=row, col=1)
    charts.legend_per_row(fig)
    assert [t.legend or "legend" for t in fig.data] == ["legend", "legend", "legend2", "legend2", "legend3", "legend3"]
    for name, axis in (("legend", "yaxis"), ("legend2", "yaxis2"), ("legend3", "yaxis3")):
        assert fig.layout[name].y == fig.layout[axis].domain[1]  # beside its own row


def test_log_step_axes_label_powers_of_ten_only():
    fig = make_subplots(rows=2, cols=1)
    fig.add_trace(go.Scatter(x=[1, 10, 100], y=[0, 1, 2]), row=1, col=1)
    fig.add_trace(go.Scatter(x=[1, 10, 100], y=[0, 1, 2]), row=2, col=1)
    fig.update_xaxes(type="log", row=1, col=1)
    charts.tidy_log_steps(fig)
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.minor.dtick == "D1"
    assert fig.layout.xaxis2.dtick is None  # a linear axis is left as it is


def test_llc_stages_become_two_lanes_the_pieces_and_the_boundaries_windows():
    from circuits.stages import Stage as Piece
    from circuits.stages import StageBoundary, Stages

    pieces = [Piece("plateau", 0, 350, 1.0, 1.0), Piece("rise", 350, 1000, 1.0, 9.0)]
    turn = StageBoundary(step=350, window_start=300, window_end=400, kind="takes off", before="plateau",
                         after="rise", value=1.0, se=0.1)
    stages = Stages("llc", pieces, [turn], fit=np.zeros(len(STEPS)), sigma=np.ones(len(STEPS)))
    tracked = _tracking()
    tracked.llc_stages = stages
    lanes = formation.lanes(tracked)
    assert lanes[-2:] == [formation.Lane("llc stages", (formation.Span("plateau", 0, 350, 0),
                                                       formation.Span("rise", 350, 1000, 350))),
                          formation.Lane("llc boundaries", (formation.Span("takes off", 300, 400, 350),))]
