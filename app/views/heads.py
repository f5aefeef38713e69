"""Heads: head x step heatmap per detector score, the heads the library finds taking that role
(material rises only, with when they joined the stable circuit); attention pattern viewer (step,
layer, head, example) with the prompt's tokens on the axes."""

from __future__ import annotations

import streamlit as st

from app import charts, data, formation, ui
from circuits import figures

settings, study, stamp = ui.open_page("Heads")
path = settings.study
steps = [int(x) for x in study.steps]
step_now = ui.pick_step(steps, settings.step)

with ui.guard("draw the head scores"):
    tracked = data.tracking(path, stamp)
    kinds = [k.removeprefix("heads/") for k in data.head_keys(study) if k.removeprefix("heads/") in tracked.heads]
    if not kinds:
        st.info("This study has no head detector scores (the sweep ran without the heads analysis).")
    else:
        kind = st.selectbox("Detector", kinds, format_func=lambda k: k.replace("_", " "), key="heads.detector")
        left, right = st.columns(2)
        left.plotly_chart(figures.head_heatmap(tracked, kind), key="heads.heatmap")
        right.plotly_chart(figures.head_score_curves(tracked, kind, step_now), key="heads.curves")
        roles = [r for r in tracked.roles() if r.kind == kind]
        if roles:
            st.caption("  \n".join(ui.md(f"Role: {formation.role_text(role, tracked.circuit)}") for role in roles))
        else:
            st.caption(f"No head takes the {kind.replace('_', ' ')} role: no score rises >= 0.1 above step 0 "
                       "(and half the strongest head's rise).")

st.subheader("Attention pattern")


@st.fragment
def pattern_viewer() -> None:
    node = ui.settings().node or ""
    layer0, head0 = 0, 0
    if node.startswith("a"):
        from app.graph_view import parse_node

        parsed = parse_node(node)
        layer0, head0 = parsed.layer, parsed.head
    cols = st.columns(4)
    step = cols[0].select_slider("Step", options=steps, value=step_now, key="heads.step")
    layer = cols[1].number_input("Layer", 0, study.n_layers - 1, value=min(layer0, study.n_layers - 1),
                                 key="heads.layer")
    head = cols[2].number_input("Head", 0, study.n_heads - 1, value=min(head0, study.n_heads - 1),
                                key="heads.head")
    example = cols[3].number_input("Example", 0, max(study.n_examples - 1, 0),
                                   value=min(settings.example, max(study.n_examples - 1, 0)), key="heads.example")
    with ui.guard(f"show the attention pattern of a{layer}.h{head} at step {step}"):
        pattern = data.pattern(path, stamp, int(step), int(layer), int(head), int(example))
        tokens = data.tokens(path, stamp, int(example))
        st.plotly_chart(charts.attention_heatmap(pattern, tokens, f"a{layer}.h{head} at step {step}, example {example}"),
                        key="heads.pattern")


pattern_viewer()
