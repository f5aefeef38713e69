"""Formation, the landing page: when and how the circuit formed, on one screen.

Left, the timeline on a linear step axis (``?log=1``: log): the task metric, the loss and the
stable circuit's faithfulness (on 0 to 1), each curve's detected phase windows, and one lane
per list of windows the tracking result holds (each curve's phase changes, the mechanism
epochs, any other stages), the selected step marked. Clicking a point goes to its step; a
window, to its step (a phase change's midpoint, an epoch's start). Right, the circuit graph at
that step with the step slider and play. Below, the selected head's attention pattern and
roles. Everything sits in one fragment: a step change, a click or a play tick redraws timeline
and graph together, and nothing else of the page.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import charts, data, formation, ui
from app.components.circuit_graph import circuit_graph, clicked_node
from app.graph_view import parse_node
from app.state import MODE_LABELS, SPEEDS, snap_int, snap_node, threshold_default

GRAPH_WIDTH, GRAPH_HEIGHT = 640.0, 560.0  # the drawing area beside the timeline at 1400 x 900

# Streamlit's top padding (6rem) would push the graph's lower half below a 900 px screen.
st.html("<style>[data-testid='stMainBlockContainer'] { padding-top: 3.2rem; padding-bottom: 1rem; }</style>")
settings, study, stamp = ui.open_page("Formation", small=True)
path = settings.study
steps = [int(x) for x in study.steps]
tracked = None
with ui.guard("track the study across steps"):
    tracked = data.tracking(path, stamp)
stack = None
with ui.guard("read the circuits"):
    stack = data.circuit_stack(path, stamp)
nodes = list(stack.layout.nodes) if stack is not None else []
mode = settings.mode  # the Circuit page's edge selection; the stable circuit unless it chose another
top_n = int(settings.top_n)

# The URL leads (ui.lead): set at every full run, each control writes it back.
step0 = ui.step_from_url(study, steps, settings)
last_example = max(study.n_examples - 1, 0)
example0, note = snap_int("example", int(settings.example), 0, last_example)
ui.correct(note, example=example0)
node0, note = snap_node(settings.node, nodes) if nodes else (None, None)
ui.correct(note, node=node0)
ui.lead({"formation.step": step0, "formation.log": settings.log, "formation.speed": settings.speed,
         "formation.node": node0, "formation.example": example0})
st.session_state.setdefault("formation.playing", False)
if stack is not None and settings.threshold is None:
    i0 = steps.index(step0)
    threshold = threshold_default(stack.scores[i0], stack.circuit[i0] if stack.stable is not None else None,
                                  stack.in_circuit[i0])
else:
    threshold = float(settings.threshold or 0.0)


def _go_to(step: int) -> None:
    st.session_state["formation.step"] = step
    ui.update(step=step)


def _on_step() -> None:
    ui.update(step=int(st.session_state["formation.step"]))


def _shift(delta: int) -> None:
    i = steps.index(int(st.session_state["formation.step"]))
    _go_to(steps[min(max(i + delta, 0), len(steps) - 1)])


def _on_timeline() -> None:
    """A click on the timeline: go to the step the clicked point stands for."""
    state = st.session_state.get("formation.timeline")
    points = list(getattr(getattr(state, "selection", None), "points", None) or [])
    step = formation.clicked_step(points, st.session_state.get("formation.targets", []))
    if step is not None and step in steps:
        _go_to(step)


def _toggle_play() -> None:
    playing = not st.session_state["formation.playing"]
    st.session_state["formation.playing"] = playing
    if playing and int(st.session_state["formation.step"]) == steps[-1]:
        _go_to(steps[0])  # play from the start when at the end


def _on_node(node: str | None) -> None:
    st.session_state["formation.node"] = node
    ui.update(node=node)


def _on_graph_click() -> None:
    clicked = clicked_node(st.session_state.get("formation.graph"), nodes)
    if clicked is not None:
        _on_node(clicked)


def _rows() -> list[charts.Row]:
    """The curves drawn: task metric, loss, the LLC (with its stage boundaries' windows) where the
    study has it, the stable circuit's faithfulness (read on 0 to 1)."""
    curves = tracked.curves if tracked is not None else data.curves(path, stamp)
    rows = []
    for key, title in (("metric", "task metric"), ("task metric", "task metric"), ("loss", "loss")):
        if key in curves and all(r.title != title for r in rows):
            windows = tuple((p.start_step, p.end_step) for p in (tracked.phases_of(key) if tracked else []))
            rows.append(charts.Row(title, np.asarray(curves[key], dtype=float), windows))
    llc = getattr(tracked, "llc_stages", None)
    if "llc" in curves and np.isfinite(np.asarray(curves["llc"], dtype=float)).any():  # --analyses llc
        windows = tuple((b.window_start, b.window_end) for b in (llc.boundaries if llc is not None else []))
        rows.append(charts.Row("LLC", np.asarray(curves["llc"], dtype=float), windows))
    faith = curves.get("circuit/faithfulness")
    if faith is not None and np.isfinite(faith).any():
        rows.append(charts.Row("faithfulness", np.asarray(faith, dtype=float),
                               y_range=charts.honest_range(np.asarray(faith, dtype=float))))
    return rows


def _draw_graph(view: dict) -> None:
    circuit_graph(view, key="formation.graph", on_node=_on_graph_click)


def step_controls() -> None:
    row = st.columns([1, 8, 1, 4, 4], vertical_alignment="center")
    row[0].button("", icon=":material/chevron_left:", key="formation.prev", on_click=_shift, args=(-1,),
                  help="Previous step")
    row[1].select_slider("Step", options=steps, key="formation.step", on_change=_on_step,
                         label_visibility="collapsed")
    row[2].button("", icon=":material/chevron_right:", key="formation.next", on_click=_shift, args=(1,),
                  help="Next step")
    playing = st.session_state["formation.playing"]
    row[3].button("Pause" if playing else "Play", key="formation.play", on_click=_toggle_play,
                  icon=":material/pause:" if playing else ":material/play_arrow:",
                  help="Animate timeline and graph through the steps")
    row[4].selectbox("Speed", SPEEDS, key="formation.speed", format_func=lambda s: f"{s:g} s/step",
                     label_visibility="collapsed",
                     on_change=lambda: ui.update(speed=float(st.session_state["formation.speed"])))


@st.cache_data(max_entries=16, show_spinner=False)
def timeline_base(path_: str, stamp_: float, log: bool) -> tuple[dict, list] | None:
    """The timeline without the step mark, once per study version and axis (building a plotly
    figure with subplots is the slow part of a step switch); None when there is nothing to draw."""
    lanes = formation.lanes(tracked) if tracked is not None else []
    rows = _rows()
    if not rows and not lanes:
        return None
    fig, targets = charts.timeline(steps, rows, lanes, None, log)
    return fig.to_plotly_json(), targets


def timeline_panel(step: int) -> None:
    st.toggle("log step axis", key="formation.log",
              on_change=lambda: ui.update(log=bool(st.session_state["formation.log"])))
    log = bool(st.session_state["formation.log"])
    drawn = timeline_base(path, stamp, log)
    if drawn is None:
        st.info("This study holds no metric, loss or phase to draw over training.")
        return
    base, targets = drawn
    fig = charts.mark_step(go.Figure(base), charts.step_x(steps, step, log))
    st.session_state["formation.targets"] = targets
    st.plotly_chart(fig, key="formation.timeline", on_select=_on_timeline, selection_mode="points",
                    config={"displayModeBar": False})
    st.caption("Click a point to go to its step, a window to its phase change's step (an epoch: its first). "
               "Shaded on each curve: its phase windows.")


def graph_panel(step: int) -> None:
    if stack is None:
        st.info("This study has no circuits yet: sweep it with a circuit method (e.g. `--method eap`) to see "
                "the graph at each step here.")
        return
    selected = st.session_state["formation.node"]
    view = data.graph_json(path, stamp, step, mode, threshold, top_n, selected, GRAPH_WIDTH, GRAPH_HEIGHT)
    counts = view["counts"]
    since = f"since step {view['previous_step']}" if view["previous_step"] is not None else "(first step)"
    i = steps.index(step)
    has, line = formation.step_status(stack.explained, i)
    what = MODE_LABELS.get(mode, mode)
    st.caption(ui.md(f"Step {step:,}: {what}, {counts['kept'] + counts['added']} edges ({counts['added']} added, "
                     f"{counts['removed']} removed {since}). {line}."))
    _draw_graph(view)


def node_panel(step: int) -> None:
    node = st.selectbox("Node", nodes, key="formation.node", index=None,
                          placeholder="click a node in the graph, or pick one here",
                          on_change=lambda: _on_node(st.session_state["formation.node"]))
    if node is None:
        return
    parsed = parse_node(node)
    if parsed.kind != "head":
        st.caption("Attention patterns and roles exist for attention heads only.")
        return
    left, right = st.columns([3, 2])
    with left, ui.guard(f"show the attention pattern of {node} at step {step}"):
        example = st.number_input(f"Example (0 to {last_example})", min_value=0, max_value=last_example,
                                  key="formation.example",
                                  on_change=lambda: ui.update(example=int(st.session_state["formation.example"])))
        pattern = data.pattern(path, stamp, step, parsed.layer, parsed.head, int(example))
        tokens = data.tokens(path, stamp, int(example))
        fig = charts.attention_heatmap(pattern, tokens, f"{node} at step {step}, example {example}")
        fig.update_layout(height=420)
        st.plotly_chart(fig, key="formation.pattern")
    with right, ui.guard(f"show the roles of {node}"):
        roles = [r for r in data.roles(path, stamp) if r.head == node]
        circuit = tracked.circuit if tracked is not None else None
        if roles:
            st.markdown("  \n".join(ui.md(f"Role: {formation.role_text(role, circuit)}") for role in roles))
        else:
            st.caption("No material detector role (no score rising >= 0.1 above step 0 and half the strongest "
                       "head's rise).")


PLAYING = bool(st.session_state["formation.playing"])  # as this full run sets the fragment's timer


@st.fragment(run_every=float(st.session_state["formation.speed"]) if PLAYING else None)
def formation_view() -> None:
    if bool(st.session_state["formation.playing"]) != PLAYING:
        # Play/Pause was pressed inside this fragment: only a full run starts or stops its timer.
        st.rerun(scope="app")
    if st.session_state["formation.playing"]:
        i = steps.index(int(st.session_state["formation.step"]))
        if i + 1 >= len(steps):
            st.session_state["formation.playing"] = False
            st.rerun(scope="app")
        _go_to(steps[i + 1])
    step = int(st.session_state["formation.step"])
    left, right = st.columns([11, 9])
    with right:  # filled first: the graph reaches the browser before the timeline's heavier redraw
        step_controls()
        with ui.guard(f"draw the circuit at step {step}"):
            graph_panel(step)
    with left, ui.guard("draw the timeline"):
        timeline_panel(step)
    if nodes:
        with ui.guard("show the selected node"):
            node_panel(step)


formation_view()
