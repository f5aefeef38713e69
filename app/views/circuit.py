"""Circuit: the graph at the selected step (fixed positions, edges added/removed since the
previous step), a step slider with play, edge selection (the stable circuit by default, the
full-data circuit, or all scores by threshold / top n), whether the step has a circuit to
explain, the trust check at checked steps, the drawn edges with score +- se and inclusion, and
the selected head's attention pattern, detector scores and material roles.

Moving the slider reruns only the ``graph_panel`` fragment; play reruns it on a timer.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import charts, data, formation, ui
from app.components.circuit_graph import circuit_graph, clicked_node
from app.graph_view import KEY_EDGES, parse_node
from app.state import MODE_LABELS, MODES, SPEEDS, snap_int, snap_node, threshold_default

GRAPH_WIDTH, GRAPH_HEIGHT = 760.0, 500.0  # the drawing area: fills the graph's column, fits a 900 px screen

settings, study, stamp = ui.open_page("Circuit")
path = settings.study
stack = ui.circuit_stack_or_stop(
    path, stamp, "This study has no circuits yet: its steps were swept without circuit discovery, "
    "or the sweep has not reached it. The Heads and Overview pages still work.")
steps = list(stack.steps)
nodes = list(stack.layout.nodes)

# The URL leads (ui.lead): at every full run the widgets are set from it, a value out of range
# corrected there with a note; each widget writes it back in its callback. So Back/Forward and
# an edited link move the view, not only the URL.
n_edges = int(np.isfinite(stack.scores[0]).sum())
step0 = ui.step_from_url(study, steps, settings)
top_n0, note = snap_int("top-n", int(settings.top_n), 1, n_edges)
ui.correct(note, top_n=top_n0)
last_example = max(study.n_examples - 1, 0)
example0, note = snap_int("example", int(settings.example), 0, last_example)
ui.correct(note, example=example0)
node0, note = snap_node(settings.node, nodes)
ui.correct(note, node=node0)
ui.lead({"circuit.step": step0, "circuit.top_n": top_n0, "circuit.mode": settings.mode,
         "circuit.speed": settings.speed, "circuit.example": example0, "circuit.node": node0})
if settings.threshold is not None:
    ui.lead({"circuit.threshold": float(settings.threshold)})
elif "circuit.threshold" not in st.session_state:  # none asked: the default at the step first shown
    i0 = steps.index(step0)
    st.session_state["circuit.threshold"] = threshold_default(
        stack.scores[i0], stack.circuit[i0] if stack.stable is not None else None, stack.in_circuit[i0])
st.session_state.setdefault("circuit.playing", False)


def _sync_selection() -> None:
    # a widget not drawn in the last run (threshold while in top-n) has left session state
    current = ui.settings()
    ui.update(mode=st.session_state.get("circuit.mode", current.mode),
              threshold=st.session_state.get("circuit.threshold", current.threshold),
              top_n=int(st.session_state.get("circuit.top_n", current.top_n)))


def _toggle_play() -> None:
    playing = not st.session_state["circuit.playing"]
    st.session_state["circuit.playing"] = playing
    if playing and st.session_state["circuit.step"] == steps[-1]:
        st.session_state["circuit.step"] = steps[0]  # play from the start when at the end
        ui.update(step=steps[0])  # the URL leads the next run: it must say so too


controls = st.columns([5, 2, 1, 1])
controls[0].radio("Edges", MODES, key="circuit.mode", horizontal=True, on_change=_sync_selection,
                  format_func=MODE_LABELS.get,
                  help="The stable circuit (edges in most bootstrap resamples, at steps that have a "
                       "circuit), the circuit selected on all prompts, a view of all edge scores, or the key "
                       f"edges: the {KEY_EDGES} strongest drawn one by one, every other edge bundled by layer pair. "
                       "Any selection too big to read is drawn that way too.")
if st.session_state["circuit.mode"] == "threshold":
    largest = float(np.nanmax(np.abs(stack.scores))) if np.isfinite(stack.scores).any() else 0.0
    controls[1].number_input(f"Threshold on |score| (0 to {largest:.4g})", min_value=0.0, key="circuit.threshold",
                             on_change=_sync_selection, format="%.4g", step=max(largest / 50, 1e-6),
                             help=f"Starts at the circuit's smallest |score| at the step first shown; the "
                                  f"largest |score| in the study is {largest:.4g} (above it nothing is drawn)")
elif st.session_state["circuit.mode"] == "top-n":
    controls[1].number_input(f"Top n edges (1 to {n_edges})", min_value=1, max_value=n_edges, step=10,
                             key="circuit.top_n", on_change=_sync_selection,
                             help=f"the n edges of largest |score|; the graph has {n_edges} possible edges")
playing = st.session_state["circuit.playing"]
controls[2].button("Pause" if playing else "Play", key="circuit.play", on_click=_toggle_play,
                   icon=":material/pause:" if playing else ":material/play_arrow:",
                   help="Animate the graph through the steps")
controls[3].selectbox("Speed", SPEEDS, key="circuit.speed", format_func=lambda s: f"{s:g} s/step",
                      on_change=lambda: ui.update(speed=float(st.session_state["circuit.speed"])))

mode = st.session_state["circuit.mode"]
threshold = float(st.session_state["circuit.threshold"])
top_n = int(st.session_state.get("circuit.top_n", settings.top_n))


def _on_step() -> None:
    ui.update(step=int(st.session_state["circuit.step"]))


def _shift(delta: int) -> None:
    i = steps.index(st.session_state["circuit.step"])
    st.session_state["circuit.step"] = steps[min(max(i + delta, 0), len(steps) - 1)]
    _on_step()


def _on_node_select() -> None:
    ui.update(node=st.session_state["circuit.node"])


def _on_graph_click() -> None:
    clicked = clicked_node(st.session_state.get("circuit.graph"), nodes)
    if clicked is not None:
        st.session_state["circuit.node"] = clicked
        ui.update(node=clicked)


@st.fragment(run_every=float(st.session_state["circuit.speed"]) if playing else None)
def graph_panel() -> None:
    if st.session_state["circuit.playing"]:
        i = steps.index(st.session_state["circuit.step"])
        if i + 1 >= len(steps):
            st.session_state["circuit.playing"] = False
            st.rerun(scope="app")
        st.session_state["circuit.step"] = steps[i + 1]
        ui.update(step=steps[i + 1])
    row = st.columns([1, 12, 1])
    row[0].button("", icon=":material/chevron_left:", key="circuit.prev", on_click=_shift, args=(-1,),
                  help="Previous step")
    row[1].select_slider("Step", options=steps, key="circuit.step", on_change=_on_step,
                         label_visibility="collapsed")
    row[2].button("", icon=":material/chevron_right:", key="circuit.next", on_click=_shift, args=(1,),
                  help="Next step")
    step = int(st.session_state["circuit.step"])
    selected = st.session_state["circuit.node"]
    view = data.graph_json(path, stamp, step, mode, threshold, top_n, selected, GRAPH_WIDTH, GRAPH_HEIGHT)
    counts = view["counts"]
    since = f"since step {view['previous_step']}" if view["previous_step"] is not None else "(first step)"
    # The graph beside the step's numbers and the node panel, right under the slider: the whole
    # graph is on a 1400 x 900 screen (the component also shrinks it to the room left below it).
    left, right = st.columns([7, 3])
    with left:
        circuit_graph(view, key="circuit.graph", on_node=_on_graph_click)
    with right:
        stats = st.columns(2)
        stats[0].metric("Step", f"{step:,}")
        stats[1].metric("Edges drawn", counts["kept"] + counts["added"])
        stats[0].metric(f"Added {since}", counts["added"])
        stats[1].metric(f"Removed {since}", counts["removed"])
        with ui.guard(f"say whether step {step} has a circuit"):
            circuit_status(step)
        with ui.guard(f"show the trust check at step {step}"):
            trust_status(step)
        st.selectbox("Node", nodes, key="circuit.node", on_change=_on_node_select, index=None,
                     placeholder="click a node in the graph, or pick one here")
        node_panel(step, st.session_state["circuit.node"])
    with ui.guard(f"list the edges drawn at step {step}"):
        rows = data.edge_table(path, stamp, step, mode, threshold, top_n)
        with st.expander(f"Edges drawn at step {step} ({len(rows)}), strongest first: score +- se, share of resamples"):
            st.dataframe(rows, hide_index=True, key="circuit.edges")
    with ui.guard("draw the metric over training"):
        series = data.curves(path, stamp)
        if series:
            fig = charts.lines_over_steps(steps, series, step, "Over training (this step marked)")
            fig.update_layout(height=230)
            st.plotly_chart(fig, key="circuit.curves")


def circuit_status(step: int) -> None:
    """Whether the step has a circuit to explain (the library's rule, from the stored numbers)."""
    i = steps.index(step)
    has, line = formation.step_status(stack.explained, i)
    if mode == "circuit" and stack.stable is None:
        st.caption("This study has no stable circuit (swept without the bootstrap): the stable-circuit view "
                   "shows the full-data circuit.")
    if not has:
        what = ("nothing to draw as its stable circuit. The scores are still there: choose |score| >= "
                "threshold or top n" if mode == "circuit" else "what is drawn is not a circuit to explain")
        st.info(f"Step {step}: {ui.md(line)}; {what}.", icon=":material/info:")
    elif mode == "circuit" and stack.stable is not None:
        resamples, share = data.bootstrap_settings(study)
        faith = data.array(path, stamp, "circuit/stable_faithfulness")
        faithful = "" if faith is None or not np.isfinite(faith[i]) else f", faithfulness {float(faith[i]):.2f}"
        said = f"{line}. " if line else ""
        st.caption(ui.md(f"Step {step}: {said}Stable circuit: the edges in >= {share:.0%} of {resamples} "
                         f"bootstrap resamples ({int(stack.circuit[i].sum())} edges{faithful})."))
    elif line:
        st.caption(ui.md(f"Step {step}: {line}."))


def trust_status(step: int) -> None:
    """At a step checked against exact patching: the summary's line on it, a warning when poor."""
    reports, trust_settings = data.trust(path, stamp)
    report = formation.report_at(reports, step)
    if report is None:
        return
    lines = formation.trust_lines_at(report, trust_settings)
    if report.poor:
        st.warning("  \n".join(ui.md(line) for line in lines), icon=":material/warning:")
    else:
        st.caption(ui.md(lines[0]))


def node_panel(step: int, node: str | None) -> None:
    if node is None:
        st.caption("Select a head to see its attention pattern at this step and its scores over training.")
        return
    parsed = parse_node(node)
    with ui.guard(f"list the edges of {node}"):
        touching = data.node_edges(path, stamp, step, mode, threshold, top_n, node)
        if touching:
            st.caption(f"{node}'s edges at step {step} ({len(touching)}), strongest first")
            st.dataframe(touching, hide_index=True, height=min(35 * len(touching) + 40, 220),
                         key="circuit.node_edges")
        else:
            st.caption("No drawn edge touches this node at this step.")
    if parsed.kind != "head":
        st.caption("Attention patterns and detector scores exist for attention heads only.")
        return
    with ui.guard(f"show the attention pattern of {node} at step {step}"):
        example = st.number_input(f"Example (0 to {last_example})", min_value=0, max_value=last_example,
                                  key="circuit.example", on_change=lambda: ui.update(
                                      example=int(st.session_state["circuit.example"])))
        pattern = data.pattern(path, stamp, step, parsed.layer, parsed.head, int(example))
        tokens = data.tokens(path, stamp, int(example))
        st.plotly_chart(charts.attention_heatmap(pattern, tokens, f"{node} at step {step}, example {example}"),
                        key="circuit.pattern")
    with ui.guard(f"show the detector scores of {node}"):
        series = {}
        for key in data.head_keys(study):
            values = data.array(path, stamp, key)
            series[key.removeprefix("heads/")] = values[:, parsed.layer, parsed.head]
        if series:
            st.plotly_chart(charts.lines_over_steps(steps, series, step, f"{node}: detector scores", "score"),
                            key="circuit.node_scores")
            role_lines(node)
        else:
            st.caption("This study has no head detector scores.")


def role_lines(node: str) -> None:
    """The detector roles the library finds material for this head (none: a caption saying so)."""
    roles = [r for r in data.roles(path, stamp) if r.head == node]
    if roles:
        st.caption("  \n".join(ui.md(f"Role: {formation.role_text(role)}") for role in roles))
    else:
        st.caption("No material detector role (no score rising >= 0.1 above step 0 and half the strongest head's rise).")


graph_panel()
