"""Plotly figures of a tracked study: curves with phase windows, head x step heatmaps, circuit.

Every function takes a ``Tracking`` (``circuits.tracking.track(study)``) and returns a
``plotly.graph_objects.Figure``; the app reuses them. ``write_figures`` writes each figure as
interactive HTML and as PNG: through ``kaleido`` when installed, else through a headless
Chromium screenshot of the HTML when one is installed, else none (with a note).
Drawing lives here, apart from the data: nothing in the library imports this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from circuits.errors import first_line
from circuits.tracking import Tracking, head_name

if TYPE_CHECKING:  # plotly loads lazily (it is slow to import); only the annotations need it here
    from plotly.graph_objects import Figure

PHASE_COLOUR = "rgba(255, 165, 0, 0.18)"


def _go():
    import plotly.graph_objects as go

    return go


def _shade_phases(fig, tracking: Tracking, curves: list[str] | None = None, row=None, col=None) -> None:
    """Shade each phase window (of the given curves, default metric and loss) on a figure."""
    wanted = curves or ["metric", "loss"]
    floor = _log_floor(tracking)
    seen: list[tuple[int, int]] = []
    for p in tracking.phases:
        if p.curve not in wanted or (p.start_step, p.end_step) in seen:
            continue
        # Label a window once, and not when it overlaps one already labelled (unreadable).
        overlaps = any(p.start_step < end and start < p.end_step for start, end in seen)
        label = "" if overlaps or (row is not None and row > 1) else f"{p.curve} {p.direction}"
        seen.append((p.start_step, p.end_step))
        kwargs = {"row": row, "col": col} if row is not None else {}
        x0, x1 = (step if floor is None else max(step, floor) for step in (p.start_step, p.end_step))
        if label:  # an empty label would still add an annotation (see below)
            kwargs |= {"annotation_text": label, "annotation_position": "top left"}
            if floor is not None:
                # Shapes take data units on a log axis, annotations log10 units: placed in data
                # units a label sits at 10^step and stretches the axis to absurd ranges.
                kwargs["annotation"] = {"x": math.log10(x0)}
        fig.add_vrect(x0=x0, x1=x1, fillcolor=PHASE_COLOUR, line_width=0, **kwargs)


def _log_steps(tracking: Tracking) -> bool:
    """Log-then-linear schedules of long runs (Pythia, grokking) read best on a log step axis."""
    steps = np.asarray(tracking.steps)
    return bool(len(steps) > 2 and steps[1] > 0 and steps[-1] / max(steps[1], 1) > 200)


def _log_floor(tracking: Tracking) -> int | None:
    """On a log step axis, the least step a shape (phase window, step marker) may sit at: step 0
    has no place there, so it sits at the first positive step. None on a linear axis."""
    return min(s for s in tracking.steps if s > 0) if _log_steps(tracking) else None


def _step_marker(fig, tracking: Tracking, step: int) -> None:
    floor = _log_floor(tracking)
    fig.add_vline(x=step if floor is None else max(step, floor), line_dash="dash", line_color="grey")


def _x_axis(fig, tracking: Tracking, rows: int = 1) -> None:
    # With stacked subplots only the bottom axis is titled, so it cannot overlap a subplot title.
    fig.update_xaxes(title_text="training step", row=rows if rows > 1 else None, col=1 if rows > 1 else None)
    if _log_steps(tracking):
        fig.update_xaxes(type="log")


def metric_curves(tracking: Tracking, names: list[str] | None = None, step: int | None = None):
    """Metric, loss and progress curves over steps (one subplot each), phase windows shaded."""
    from plotly.subplots import make_subplots

    go = _go()
    names = names or [n for n in tracking.curves if not n.startswith("circuit/")]
    height = 220 * len(names) + 80
    # ~60 px between subplots whatever their number (a share of the height would squeeze many).
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, subplot_titles=names,
                        vertical_spacing=min(0.12, 60 / height))
    for i, name in enumerate(names, start=1):
        fig.add_trace(go.Scatter(x=tracking.steps, y=tracking.curves[name], mode="lines+markers",
                                 name=name, marker={"size": 4}), row=i, col=1)
        _shade_phases(fig, tracking, [name, "metric", "loss"], row=i, col=1)
    if step is not None:
        _step_marker(fig, tracking, step)
    _x_axis(fig, tracking, rows=len(names))
    fig.update_layout(height=height, showlegend=False, title=f"{tracking.run}: curves over training")
    return fig


def head_score_curves(tracking: Tracking, kind: str, step: int | None = None):
    """Every head's score of one detector kind over steps; phase windows of the metric shaded."""
    go = _go()
    scores = tracking.heads[kind]
    fig = go.Figure()
    top = tracking.top_head(kind)
    for layer in range(scores.shape[1]):
        for head in range(scores.shape[2]):
            is_top = (layer, head) == top
            fig.add_trace(go.Scatter(x=tracking.steps, y=scores[:, layer, head], mode="lines",
                                     name=head_name(layer, head), line={"width": 3 if is_top else 1}))
    _shade_phases(fig, tracking, ["metric", "loss", f"heads/{kind}/{head_name(*top)}"])
    if step is not None:
        _step_marker(fig, tracking, step)
    _x_axis(fig, tracking)
    fig.update_layout(title=f"{kind.replace('_', ' ')} score per head", yaxis_title="score", height=420)
    return fig


def head_heatmap(tracking: Tracking, kind: str):
    """Heads (rows, ``a{layer}.h{head}``) x steps (columns), coloured by one detector's score."""
    go = _go()
    scores = tracking.heads[kind]
    n_steps, n_layers, n_heads = scores.shape
    z = scores.reshape(n_steps, n_layers * n_heads).T
    labels = [head_name(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    fig = go.Figure(go.Heatmap(z=z, x=[str(int(s)) for s in tracking.steps], y=labels,
                               colorscale="Viridis", zmin=0, zmax=1, colorbar={"title": "score"}))
    # Steps as categories: one column per checkpoint, however uneven the schedule.
    fig.update_layout(title=f"{kind.replace('_', ' ')} score: head x step", xaxis_title="training step",
                      xaxis={"type": "category"}, yaxis={"autorange": "reversed"},
                      height=max(300, 22 * len(labels) + 140))
    return fig


def circuit_evolution(tracking: Tracking, step: int | None = None):
    """Circuit size, faithfulness and similarity (adjacent and to the final circuit) over steps."""
    from plotly.subplots import make_subplots

    go = _go()
    c = tracking.circuit
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True,
                        subplot_titles=["circuit size", "faithfulness", "similarity"])
    if c is None:
        fig.add_annotation(text="this study has no circuit data", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
        return fig
    x = tracking.steps
    fig.add_trace(go.Scatter(x=x, y=c.n_edges, name="edges", mode="lines+markers"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=c.n_nodes, name="nodes", mode="lines+markers"), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=c.edges_added, name="edges added", opacity=0.5), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=-c.edges_removed, name="edges removed", opacity=0.5), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=c.faithfulness, name="faithfulness", mode="lines+markers"), row=2, col=1)
    for label, series in (("Jaccard, adjacent", c.jaccard_adjacent), ("Jaccard, to final", c.jaccard_final),
                          ("weighted Jaccard, adjacent", c.weighted_jaccard_adjacent),
                          ("weighted Jaccard, to final", c.weighted_jaccard_final)):
        fig.add_trace(go.Scatter(x=x, y=series, name=label, mode="lines"), row=3, col=1)
    for row in (1, 2, 3):
        _shade_phases(fig, tracking, row=row, col=1)
    if step is not None:
        _step_marker(fig, tracking, step)
    _x_axis(fig, tracking)
    fig.update_layout(title=f"{tracking.run}: the circuit over training", height=800, barmode="relative")
    return fig


def all_figures(tracking: Tracking) -> dict[str, Figure]:
    """Name -> figure for everything ``write_figures`` writes."""
    figures = {"curves": metric_curves(tracking)}
    for kind in tracking.heads:
        figures[f"heads_{kind}"] = head_score_curves(tracking, kind)
        figures[f"heatmap_{kind}"] = head_heatmap(tracking, kind)
    if tracking.circuit is not None:
        figures["circuit"] = circuit_evolution(tracking)
    return figures


def png_available() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _chromium() -> str | None:
    import shutil

    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def _screenshot(browser: str, html: Path, png: Path, fig) -> None:
    """PNG of a written HTML figure through a headless Chromium (when kaleido is missing)."""
    import subprocess

    width = int(fig.layout.width or 1100)
    height = int(fig.layout.height or 500) + 20
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--screenshot={png}", f"--window-size={width},{height}",
                    html.resolve().as_uri()], check=True, capture_output=True, timeout=90)
    if not png.exists():
        raise RuntimeError("the browser wrote no screenshot")


def write_figures(tracking: Tracking, study=None, out_dir: Path | str = "figures", png: bool = True) -> dict[str, list[str]]:
    """Write every figure to ``out_dir`` as ``NAME.html`` and, when a renderer is there, ``NAME.png``.

    The HTML files share one ``plotly.min.js`` written beside them (works offline).

    ``png=False`` writes HTML only. Returns ``{"html": [...], "png": [...], "notes": [...]}``
    with the paths written.
    ``study`` is accepted for symmetry with the app and future figures; the tracking holds
    everything drawn here.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {"html": [], "png": [], "notes": []}
    browser = _chromium() if png else None
    renderer = None if not png else "kaleido" if png_available() else ("chromium" if browser else None)
    if png and renderer is None:
        written["notes"].append("PNG skipped: neither the 'kaleido' package nor a Chromium browser is installed "
                                "(pip install kaleido)")
    for name, fig in all_figures(tracking).items():
        html = out / f"{name}.html"
        fig.write_html(str(html), include_plotlyjs="directory", full_html=True)
        written["html"].append(str(html))
        if renderer is None:
            continue
        target = out / f"{name}.png"
        try:
            if renderer == "kaleido":
                fig.write_image(str(target), scale=2)
            elif browser:  # always there: "chromium" is chosen only when a browser was found
                _screenshot(browser, html, target, fig)
            written["png"].append(str(target))
        except Exception as err:  # a renderer that cannot run here: keep the HTML, say why once
            written["notes"].append(f"PNG skipped: {renderer} failed on {name} ({first_line(err, 160)})")
            renderer = None
    return written
