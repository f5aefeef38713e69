"""Compare: two steps side by side with their shared / added / removed edges (of the stable
circuit unless the Circuit page chose another selection), whether each step has a circuit, and
the step x step Jaccard similarity of circuits."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import charts, data, formation, graph_view, ui
from app.components.circuit_graph import circuit_graph
from app.state import MODE_LABELS, order_pair, snap_step, threshold_default
from circuits.graph import jaccard

settings, study, stamp = ui.open_page("Compare")
path = settings.study
stack = ui.circuit_stack_or_stop(path, stamp, "This study has no circuits yet: nothing to compare.")
steps = list(stack.steps)
mode, top_n = settings.mode, settings.top_n

# The pair from the URL: ``step`` the later step, ``base`` the earlier (by default the step
# before it); each corrected when the study lacks it, and ordered earlier first.
later = ui.step_from_url(study, steps, settings)
base, note = (steps[max(steps.index(later) - 1, 0)], None) if settings.base is None else snap_step(
    steps, settings.base, ui.damaged(study), ui.missing(study), "earlier step")
ui.correct(note, base=base)
earlier, later, note = order_pair(base, later)
if earlier != base:  # asked later step first: the URL is rewritten in order
    ui.correct(note, base=earlier, step=later)
threshold = settings.threshold
if threshold is None:  # threshold mode's default, as on the Circuit page (at the later step)
    i = steps.index(later)
    threshold = threshold_default(stack.scores[i], stack.circuit[i] if stack.stable is not None else None,
                                  stack.in_circuit[i])


def _on_pair() -> None:
    ui.update(base=int(st.session_state["compare.a"]), step=int(st.session_state["compare.b"]))


cols = st.columns(2)
for key, value in (("compare.a", earlier), ("compare.b", later)):
    st.session_state[key] = value  # the URL leads; a choice here writes it first (_on_pair)
a = cols[0].selectbox("Earlier step", steps, key="compare.a", on_change=_on_pair)
b = cols[1].selectbox("Later step", steps, key="compare.b", on_change=_on_pair)
a, b, pair_note = order_pair(a, b)  # chosen here the other way round (or the same step twice): said
if pair_note:
    st.info(ui.md(pair_note), icon=":material/swap_horiz:")

st.caption(f"Comparing the {MODE_LABELS.get(mode, mode)} (the Circuit page's edge selection).")
with ui.guard(f"say whether steps {a} and {b} have a circuit"):
    for step in (a, b):
        has, line = formation.step_status(stack.explained, steps.index(step))
        if not has:
            st.info(f"Step {step}: {ui.md(line)}.", icon=":material/info:")

with ui.guard(f"compare steps {a} and {b}"):
    ia, ib = steps.index(a), steps.index(b)
    mask_a = data.selection_at(stack, ia, mode, threshold, top_n)
    mask_b = data.selection_at(stack, ib, mode, threshold, top_n)
    kept, added, removed = graph_view.diff(mask_a, mask_b)
    stats = st.columns(4)
    stats[0].metric("Shared edges", int(kept.sum()))
    stats[1].metric(f"Added by step {b}", int(added.sum()))
    stats[2].metric(f"Removed by step {b}", int(removed.sum()))
    stats[3].metric("Jaccard", f"{jaccard(mask_a, mask_b):.3f}")
    forward, backward = list(stack.forward_names), list(stack.backward_names)
    left, right = st.columns(2)
    with left:
        st.caption(f"Step {a}")
        circuit_graph(graph_view.view(stack.layout, forward, backward, stack.scores[ia], mask_a,
                                      stats=stack.stats(ia)) | {"step": a}, key="compare.graph_a")
    with right:
        st.caption(f"Step {b}: added (green halo) and removed (dashed) relative to step {a}")
        circuit_graph(graph_view.view(stack.layout, forward, backward, stack.scores[ib], mask_b, mask_a,
                                      stack.scores[ia], stats=stack.stats(ib), previous_stats=stack.stats(ia))
                      | {"step": b}, key="compare.graph_b")
    rows = []
    inclusion = stack.inclusion
    for status, mask in (("added", added), ("removed", removed), ("shared", kept)):
        for r, c in zip(*np.nonzero(mask), strict=True):
            row = {"edge": f"{forward[r]}->{backward[c]}", "status": status,
                   f"score at {a}": float(stack.scores[ia, r, c]), f"score at {b}": float(stack.scores[ib, r, c])}
            if inclusion is not None:
                row |= {f"in resamples at {a}": float(inclusion[ia, r, c]),
                        f"in resamples at {b}": float(inclusion[ib, r, c])}
            rows.append(row)
    with st.expander(f"Edge list ({len(rows)})"):
        st.dataframe(rows, hide_index=True, key="compare.edges")

with ui.guard("draw the similarity matrix"):
    matrix = data.jaccard_matrix(path, stamp, mode, threshold, top_n)
    st.plotly_chart(charts.jaccard_heatmap(steps, matrix, (a, b)), key="compare.jaccard")
