"""Small plotly figures specific to the app (attention maps, per-head lines, Jaccard matrix).

Study-level figures (metric curves with phase windows, circuit size, head x step heatmaps)
come from ``circuits.figures`` when it provides them; these are the app's own views.
Every label from a file goes through ``plain`` (plotly renders a subset of HTML).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go


def plain(text: object) -> str:
    return html.escape(str(text), quote=False)


def token_labels(tokens: list[str]) -> list[str]:
    """Unique, escaped axis labels ``i: token`` (plotly merges equal category labels)."""
    return [f"{i}: {plain(t)}" for i, t in enumerate(tokens)]


def attention_heatmap(pattern: np.ndarray, tokens: list[str], title: str) -> go.Figure:
    """Query x key attention probabilities with the prompt's tokens on both axes."""
    q, k = pattern.shape
    labels = token_labels(tokens) if len(tokens) >= max(q, k) else [str(i) for i in range(max(q, k))]
    fig = go.Figure(go.Heatmap(
        z=pattern, x=labels[:k], y=labels[:q], colorscale="Blues", zmin=0.0, zmax=1.0,
        colorbar={"title": "attn"},
        hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=title, height=520, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      yaxis={"autorange": "reversed", "title": "query", "type": "category"},
                      xaxis={"title": "key", "type": "category", "tickangle": -60})
    return fig


def lines_over_steps(steps: list[int], series: dict[str, np.ndarray], step: int | None,
                     title: str, y_title: str = "") -> go.Figure:
    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=plain(name)))
    if step is not None:
        fig.add_vline(x=step, line_dash="dot", line_color="#ff7f0e")
    above = {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1}
    below = {"orientation": "h", "yanchor": "top", "y": -0.3, "xanchor": "left", "x": 0}
    many = len(series) > 2
    fig.update_layout(title=title, height=380 if many else 300, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis_title="step", yaxis_title=y_title, legend=below if many else above)
    return fig


def head_by_step(steps: list[int], scores: np.ndarray, step: int | None, title: str) -> go.Figure:
    """Head x step heatmap of one detector's scores ([n_steps, L, H])."""
    n_steps, n_layers, n_heads = scores.shape
    z = scores.reshape(n_steps, n_layers * n_heads).T
    heads = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(s) for s in steps], y=heads, colorscale="Viridis",
        hovertemplate="step %{x}<br>%{y}<br>score %{z:.3f}<extra></extra>",
    ))
    if step is not None and step in steps:
        fig.add_vline(x=steps.index(step), line_dash="dot", line_color="#ff7f0e")
    fig.update_layout(title=title, height=max(260, 22 * len(heads) + 90),
                      margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis={"title": "step", "type": "category"},
                      yaxis={"autorange": "reversed", "type": "category"})
    return fig


def jaccard_heatmap(steps: list[int], matrix: np.ndarray, marked: tuple[int, ...] = ()) -> go.Figure:
    labels = [str(s) for s in steps]
    fig = go.Figure(go.Heatmap(
        z=matrix, x=labels, y=labels, colorscale="Viridis", zmin=0.0, zmax=1.0,
        hovertemplate="step %{y} vs %{x}<br>Jaccard %{z:.3f}<extra></extra>",
    ))
    for s in marked:
        if s in steps:
            fig.add_vline(x=steps.index(s), line_dash="dot", line_color="#ff7f0e")
            fig.add_hline(y=steps.index(s), line_dash="dot", line_color="#ff7f0e")
    fig.update_layout(title="Circuit similarity between steps (Jaccard of edge sets)", height=520,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis={"type": "category", "title": "step"},
                      yaxis={"type": "category", "autorange": "reversed", "title": "step"})
    return fig


EPOCH_COLOURS = ("rgba(33, 102, 172, 0.13)", "rgba(26, 152, 80, 0.13)", "rgba(153, 112, 171, 0.15)",
                 "rgba(230, 97, 1, 0.13)")
NO_CIRCUIT_COLOUR = "rgba(158, 158, 158, 0.18)"


def band_edges(steps: list[int], starts: list[int], ends: list[int]) -> list[tuple[float, float]]:
    """x extents of bands covering runs of steps: each boundary halfway between one run's last step and
    the next run's first, so that a one-step run still shows."""
    out = []
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        x0 = float(start) if k == 0 else (ends[k - 1] + start) / 2
        x1 = float(end) if k == len(starts) - 1 else (end + starts[k + 1]) / 2
        if x0 == x1:  # a study of one step
            x0, x1 = x0 - 0.5, x1 + 0.5
        out.append((x0, x1))
    return out


def formation_timeline(steps: list[int], gap: np.ndarray, se: np.ndarray, share: np.ndarray,
                       reproducibility: np.ndarray, has_circuit: np.ndarray, bands: list[tuple[str, bool, int, int]],
                       reproducible: float, checked: tuple[tuple[int, bool], ...] = (), step: int | None = None
                       ) -> go.Figure:
    """The gap +- se per step (steps with a circuit filled, without hollow) over the epochs of the
    mechanism as labelled bands; below, the gap's share of the study's largest and the resamples'
    reproducibility with its bar, and the steps checked against exact patching (``checked``:
    (step, poor), red when poor). ``bands`` are (label, has_circuit, start step, end step)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.06)
    x = np.asarray(steps)
    has = np.asarray(has_circuit, dtype=bool)
    hover = [f"step {s}<br>gap {g:.3g} +- {e:.2g}<br>share {sh:.1%}<br>reproducibility {r:.2f}"
             for s, g, e, sh, r in zip(steps, gap, se, share, reproducibility, strict=True)]
    for name, chosen, marker in (("has a circuit", has, {"color": "#2166ac", "size": 8}),
                                 ("no circuit", ~has, {"color": "#9e9e9e", "size": 8, "symbol": "circle-open"})):
        idx = np.nonzero(chosen)[0]
        fig.add_trace(go.Scatter(x=x[idx], y=np.asarray(gap)[idx], mode="markers", name=name, marker=marker,
                                 error_y={"type": "data", "array": np.asarray(se)[idx], "visible": True},
                                 text=[hover[i] for i in idx], hovertemplate="%{text}<extra></extra>"),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=share, mode="lines+markers", name="share of the largest gap",
                             line={"color": "#4393c3"}, marker={"color": np.where(has, "#2166ac", "#bdbdbd")},
                             hovertemplate="step %{x}<br>share %{y:.1%}<extra></extra>"), row=2, col=1)
    if np.isfinite(reproducibility).any():
        fig.add_trace(go.Scatter(x=x, y=reproducibility, mode="lines+markers", name="reproducibility",
                                 line={"color": "#b2182b"}, hovertemplate="step %{x}<br>reproducibility %{y:.2f}<extra></extra>"),
                      row=2, col=1)
        fig.add_hline(y=reproducible, line_dash="dot", line_color="#b2182b", row=2, col=1)
    at = {int(v): k for k, v in enumerate(steps)}
    ringed = [(c, poor) for c, poor in checked if c in at]
    if ringed:  # a diamond around each checked step's point
        fig.add_trace(go.Scatter(x=[c for c, _ in ringed], y=[float(gap[at[c]]) for c, _ in ringed], mode="markers",
                                 name="checked against exact patching (red: poor)",
                                 marker={"symbol": "diamond-open", "size": 17, "line": {"width": 2},
                                         "color": ["#b2182b" if poor else "#444444" for _, poor in ringed]},
                                 text=["poor" if poor else "not poor" for _, poor in ringed],
                                 hovertemplate="step %{x}: checked against exact patching, %{text}<extra></extra>"),
                      row=1, col=1)
    extents = band_edges(steps, [b[2] for b in bands], [b[3] for b in bands])
    colour = 0
    for k, ((label, with_circuit, _, _), (x0, x1)) in enumerate(zip(bands, extents, strict=True)):
        fill = EPOCH_COLOURS[colour % len(EPOCH_COLOURS)] if with_circuit else NO_CIRCUIT_COLOUR
        colour += int(with_circuit)
        fig.add_vrect(x0=x0, x1=x1, fillcolor=fill, line_width=0, layer="below", row="all", col=1)
        fig.add_annotation(x=(x0 + x1) / 2, y=1.0, yref="paper", yanchor="bottom", yshift=16 * (k % 2),
                           text=plain(label), showarrow=False, font={"size": 11})  # staggered: narrow bands
    if step is not None:
        fig.add_vline(x=step, line_dash="dot", line_color="#ff7f0e")
    fig.update_yaxes(title_text="gap +- se", row=1, col=1)
    fig.update_yaxes(title_text="share / repro.", range=[0, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(title={"text": "Gap +- se per step (filled: has a circuit) over the epochs of the mechanism",
                             "y": 0.98}, height=460, margin={"l": 10, "r": 10, "t": 80, "b": 10},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.17, "xanchor": "left", "x": 0})
    return fig


# ---------------------------------------------------------------- the formation view's timeline

PHASE_FILL = "rgba(255, 165, 0, 0.16)"  # circuits.figures' phase colour, so both views read alike
LANE_COLOURS = {"rise": "#f4a582", "fall": "#92c5de"}
LANE_OTHER = ("#c7e9c0", "#dadaeb")  # other windows (epochs, stages): neighbours told apart by shade
STEP_MARK = "#ff7f0e"


@dataclass(frozen=True)
class Row:
    """One curve of the timeline: its values per step, and the windows shaded on it."""

    title: str
    values: np.ndarray
    windows: tuple[tuple[int, int], ...] = ()
    y_range: tuple[float, float] | None = None  # None: plotly's own


def honest_range(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    """A y range that holds [low, high] and every finite value: a share such as faithfulness is
    read against 0 and 1, not zoomed into its noise (0.80-0.845 would make noise look large)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    lo = min(low, float(finite.min())) if finite.size else low
    hi = max(high, float(finite.max())) if finite.size else high
    pad = 0.05 * (hi - lo)
    return lo - (pad if lo < low else 0.0), hi + pad


def log_floor(steps: list[int]) -> float:
    """On a log step axis step 0 has no place: it is drawn at half the first positive step (apart
    from it, and hovering says which step it is)."""
    return min((s for s in steps if s > 0), default=2) / 2


def step_x(steps: list[int], step: int, log: bool) -> float:
    """Where ``step`` sits on the timeline's x axis (step 0 at ``log_floor`` on a log axis)."""
    return float(step if not log or step > 0 else log_floor(steps))


def mark_step(fig: go.Figure, x: float) -> go.Figure:
    """The selected step as one dotted line through every row (a single shape, paper-high: cheap
    to add to a cached figure at each step). Changes ``fig`` in place and returns it."""
    fig.add_shape(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1,
                  line={"dash": "dot", "color": STEP_MARK, "width": 2})
    return fig


TIMELINE_PX = 700
TIMELINE_FRAME_PX = 110  # the step axis, its title and the gaps between rows


def timeline(steps: list[int], rows: list[Row], lanes: list, step: int | None = None, log: bool = False
             ) -> tuple[go.Figure, list[list[int] | None]]:
    """The formation view's timeline: one row per curve (each curve's phase windows shaded) and
    one row of lanes (every phase/epoch/stage list, ``formation.lanes``), the selected step
    marked across all of them, on a linear step axis (``log``: log, step 0 at the first positive
    step). No legend: every row and lane is named on its axis.

    Returns the figure and, per trace, the step each of its points stands for (None: not
    clickable), for ``formation.clicked_step``.
    """
    from plotly.subplots import make_subplots

    n = len(rows) + (1 if lanes else 0)
    # The whole timeline fits TIMELINE_PX (beside the graph, under the page's header, on a 900 px
    # screen): lanes get thinner when there are many, curve rows share what is left.
    lane_px = 26 if len(lanes) <= 6 else max(16, 26 - 2 * (len(lanes) - 6))
    lanes_px = lane_px * len(lanes)
    row_px = max(80.0, min(120.0, (TIMELINE_PX - TIMELINE_FRAME_PX - lanes_px) / max(len(rows), 1)))
    heights = [row_px] * len(rows) + ([float(lanes_px)] if lanes else [])
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, row_heights=heights, vertical_spacing=0.035)
    floor = log_floor(steps)

    def x_of(values) -> list[float]:
        return [(v if v > 0 else floor) if log else v for v in values]

    targets: list[list[int] | None] = []
    for r, row in enumerate(rows, start=1):
        fig.add_trace(go.Scatter(x=x_of(steps), y=row.values, mode="lines+markers", name=plain(row.title),
                                 marker={"size": 5, "color": "#2166ac"}, line={"color": "#2166ac", "width": 1.5},
                                 customdata=steps, unselected={"marker": {"opacity": 1}},
                                 hovertemplate=f"step %{{customdata}}<br>{plain(row.title)} %{{y:.4g}}<extra></extra>"),
                      row=r, col=1)
        targets.append(list(steps))
        for start, end in row.windows:
            x0, x1 = x_of([start, end])
            fig.add_vrect(x0=x0, x1=x1, fillcolor=PHASE_FILL, line_width=0, layer="below", row=r, col=1)
        fig.update_yaxes(title_text=plain(row.title), title_font={"size": 11}, row=r, col=1)
        if row.y_range is not None:
            fig.update_yaxes(range=list(row.y_range), row=r, col=1)
    if lanes:
        targets += _lanes(fig, steps, lanes, n, x_of, log)
    if step is not None:
        mark_step(fig, step_x(steps, step, log))
    fig.update_xaxes(title_text="training step" + (" (log)" if log else ""), row=n, col=1)
    if log:
        # Labels at powers of ten only: plotly's minor labels ("2", "5") read like steps.
        fig.update_xaxes(type="log", dtick=1, minor={"dtick": "D1", "showgrid": True})
    fig.update_layout(height=int(TIMELINE_FRAME_PX + row_px * len(rows) + lanes_px), showlegend=False,
                      hovermode="closest", clickmode="event+select", dragmode=False,
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig, targets


def _lanes(fig: go.Figure, steps: list[int], lanes: list, row: int, x_of, log: bool) -> list[list[int] | None]:
    """Each lane's windows as labelled bars; a click on one goes to its step (a phase change's
    midpoint, an epoch's start)."""
    names = [plain(lane.name) for lane in lanes]
    width = max(steps[-1] - steps[0], 1) if steps else 1
    targets: list[list[int] | None] = []
    for lane, name in zip(lanes, names, strict=True):
        base, length, to, text, hover = [], [], [], [], []
        for span in lane.spans:
            x0, x1 = x_of([span.start, span.end])
            if x1 == x0:  # a one-checkpoint window: wide enough to see and click
                x0, x1 = (x0 / 1.08, x1 * 1.08) if log else (x0 - 0.006 * width, x1 + 0.006 * width)
            base.append(x0)
            length.append(x1 - x0)
            to.append(span.step)
            text.append(plain(span.label))
            hover.append(f"{name}: {plain(span.label)}, steps {span.start}-{span.end}<br>click: go to step {span.step}")
        # Horizontal bars: a click anywhere on a window selects it (a point in plotly's terms).
        fig.add_trace(go.Bar(y=[name] * len(base), x=length, base=base, orientation="h", text=text,
                             textposition="inside", insidetextanchor="middle", textfont={"size": 10},
                             marker={"color": [LANE_COLOURS.get(t, LANE_OTHER[k % 2]) for k, t in enumerate(text)],
                                     "line": {"color": "white", "width": 1}},
                             hovertext=hover, hoverinfo="text", width=0.7, unselected={"marker": {"opacity": 1}}),
                      row=row, col=1)
        targets.append(to)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=names[::-1], row=row, col=1,
                     tickfont={"size": 10})
    return targets


def legend_per_row(fig: go.Figure) -> go.Figure:
    """Give each subplot of a stacked figure its own legend beside it (one legend for three charts
    leaves the reader matching colours across them). Changes ``fig`` in place and returns it."""
    axes = sorted({trace.yaxis or "y" for trace in fig.data}, key=lambda a: int(a[1:] or 1))
    for n, axis in enumerate(axes, start=1):
        name = "legend" if n == 1 else f"legend{n}"
        layout_axis = fig.layout["yaxis" + axis[1:]]
        top = layout_axis.domain[1] if layout_axis.domain else 1.0
        fig.update_layout({name: {"y": top, "yanchor": "top", "x": 1.02, "xanchor": "left",
                                  "font": {"size": 11}}})
        for trace in fig.data:
            if (trace.yaxis or "y") == axis:
                trace.legend = name
    fig.update_layout(showlegend=True)
    return fig


def tidy_log_steps(fig: go.Figure) -> go.Figure:
    """On a log step axis, label powers of ten only (minor gridlines stay, unlabelled): plotly's
    minor labels ("2", "5") read like steps. Changes ``fig`` in place and returns it."""
    for axis in fig.select_xaxes():
        if axis.type == "log":
            axis.update(dtick=1, minor={"dtick": "D1", "showgrid": True})
    return fig
