"""Heads: head x step heatmap per detector score, the heads the library finds taking that role
(material rises only, with when they joined the stable circuit); attention pattern viewer (step,
layer, head, example) with the prompt's tokens on the axes."""

from __future__ import annotations

import streamlit as st

from app import charts, data, formation, ui
from app.graph_view import parse_node
from app.state import snap_choice, snap_int
from circuits import figures

settings, study, stamp = ui.open_page("Heads")
path = settings.study
steps = [int(x) for x in study.steps]
step_now = ui.step_from_url(study, steps, settings)
last_example = max(study.n_examples - 1, 0)
example0, note = snap_int("example", int(settings.example), 0, last_example)
ui.correct(note, example=example0)
layer0, head0 = 0, 0
if settings.node and settings.node.startswith("a"):
    parsed = parse_node(settings.node)
    if parsed.layer < study.n_layers and parsed.head < study.n_heads:
        layer0, head0 = parsed.layer, parsed.head
    else:
        ui.correct(f"node {settings.node} is not in this model ({study.n_layers} layers x {study.n_heads} heads); "
                   "showing a0.h0", node=None)

with ui.guard("draw the head scores"):
    tracked = data.tracking(path, stamp)
    kinds = [k.removeprefix("heads/") for k in data.head_keys(study) if k.removeprefix("heads/") in tracked.heads]
    if not kinds:
        st.info("This study has no head detector scores (the sweep ran without the heads analysis).")
    else:
        wanted, note = snap_choice("detector", settings.detector, kinds)
        ui.correct(note, detector=wanted)
        ui.lead({"heads.detector": wanted})  # the URL leads (Back/Forward included)
        kind = st.selectbox("Detector", kinds, format_func=lambda k: k.replace("_", " "), key="heads.detector",
                            on_change=lambda: ui.update(detector=st.session_state["heads.detector"]))
        left, right = st.columns(2)
        left.plotly_chart(figures.head_heatmap(tracked, kind), key="heads.heatmap")
        right.plotly_chart(charts.tidy_log_steps(figures.head_score_curves(tracked, kind, step_now)),
                           key="heads.curves")
        roles = [r for r in tracked.roles() if r.kind == kind]
        if roles:
            st.caption("  \n".join(ui.md(f"Role: {formation.role_text(role, tracked.circuit)}") for role in roles))
        else:
            st.caption(f"No head takes the {kind.replace('_', ' ')} role: no score rises >= 0.1 above step 0 "
                       "(and half the strongest head's rise).")

st.subheader("Attention pattern")


# Step, head (the URL's ``node``) and example live in the URL: set from it at every full run,
# written back by each control.
ui.lead({"heads.step": step_now, "heads.layer": layer0, "heads.head": head0, "heads.example": example0})


def _on_head() -> None:
    ui.update(node=f"a{int(st.session_state['heads.layer'])}.h{int(st.session_state['heads.head'])}")


@st.fragment
def pattern_viewer() -> None:
    cols = st.columns(4)
    step = cols[0].select_slider("Step", options=steps, key="heads.step",
                                 on_change=lambda: ui.update(step=int(st.session_state["heads.step"])))
    layer = cols[1].number_input(f"Layer (0 to {study.n_layers - 1})", 0, study.n_layers - 1,
                                 key="heads.layer", on_change=_on_head)
    head = cols[2].number_input(f"Head (0 to {study.n_heads - 1})", 0, study.n_heads - 1,
                                key="heads.head", on_change=_on_head)
    example = cols[3].number_input(f"Example (0 to {last_example})", 0, last_example, key="heads.example",
                                   on_change=lambda: ui.update(example=int(st.session_state["heads.example"])))
    with ui.guard(f"show the attention pattern of a{layer}.h{head} at step {step}"):
        pattern = data.pattern(path, stamp, int(step), int(layer), int(head), int(example))
        tokens = data.tokens(path, stamp, int(example))
        st.plotly_chart(charts.attention_heatmap(pattern, tokens, f"a{layer}.h{head} at step {step}, example {example}"),
                        key="heads.pattern")


pattern_viewer()
