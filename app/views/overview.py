"""Overview: the study (run, task, steps, provenance); which steps have a circuit to explain
(gap +- se, share of the largest gap, reproducibility) over the epochs of the mechanism, each
epoch's added and dropped edges; how far to trust the scores (the trust checks); loss and metric
curves with phase windows and each phase change's leading indicators; the stable circuit's size,
faithfulness and similarity over steps (figures from ``circuits.figures``)."""

from __future__ import annotations

import streamlit as st

from app import charts, data, formation, ui
from circuits import figures

settings, study, stamp = ui.open_page("Overview")
path = settings.study
steps = [int(x) for x in study.steps]

with ui.guard("describe the study"):
    manifest = study.manifest
    cols = st.columns(4)
    cols[0].metric("Run", str(manifest.name))
    cols[1].metric("Task", str(study.task.name))
    expected = data.expected_steps(study)
    if expected is not None:
        cols[2].metric("Steps in the study", f"{len(steps)} of {len(expected)}",
                       help="of the steps its sweep selected (the steps left out are named above)")
    else:
        cols[2].metric("Steps in the study", f"{len(steps)} of {len(manifest.steps)}",
                       help="of the manifest's checkpoints: this study does not record which its sweep selected")
    cols[3].metric("Model", f"{study.n_layers}L x {study.n_heads}H")
    tokens_per_step = getattr(manifest, "tokens_per_step", None)
    st.text(f"steps {steps[0]} .. {steps[-1]}    prompts: {study.n_examples} x {study.seq_len} tokens"
            + (f"    tokens per step: {tokens_per_step:,}" if tokens_per_step else ""))
    if expected is None and len(steps) < len(manifest.steps):
        st.caption("This study does not record which steps its sweep selected: the manifest's other "
                   "checkpoints were not selected, not reached yet, or their shards were deleted.")
    for step, problem in sorted(ui.damaged(study).items()):
        st.caption(ui.md(f"Step {step}: {problem}"))

tracked = None
with ui.guard("track the study across steps"):
    tracked = data.tracking(path, stamp)


def formation_section(tracked) -> None:
    """Which steps have a circuit to explain, over the epochs of the mechanism."""
    e = tracked.explained
    st.subheader("Something to explain")
    has = [bool(x) for x in e.has_circuit]
    first = next((s for s, h in zip(steps, has, strict=True) if h), None)
    cols = st.columns(3)
    cols[0].metric("Steps with a circuit", f"{sum(has)} of {len(steps)}")
    cols[1].metric("First circuit at step", "none yet" if first is None else f"{first:,}")
    cols[2].metric("Epochs of the mechanism", len(tracked.epochs))
    st.caption(ui.md(f"A step has a circuit when {formation.rule_text(e)} (gap = clean - corrupted metric, "
                     "mean over prompts; reproducibility = the bootstrap resamples' mean Jaccard against the "
                     "step's circuit). Epochs: runs of steps whose stable circuits stay within weighted "
                     "Jaccard 0.6 of their epoch's mean."))
    bands = [(formation.epoch_label(tracked.epochs, ep), ep.has_circuit, ep.start, ep.end) for ep in tracked.epochs]
    st.plotly_chart(charts.formation_timeline(steps, e.gap, e.gap_se, e.share, e.reproducibility, e.has_circuit,
                                              bands, e.reproducible, tuple((int(r.step), bool(r.poor)) for r in tracked.trust)),
                    key="overview.formation")
    with st.expander("Every step: circuit or not, gap +- se, z, share of the largest gap, reproducibility"):
        st.dataframe(formation.step_rows(steps, e, tracked.epochs), hide_index=True, key="overview.steps")


def epochs_section(tracked) -> None:
    """The epochs of the mechanism, each with the edges that set it apart from the one before."""
    if not tracked.epochs:
        return
    st.subheader("Epochs of the mechanism")
    st.dataframe(formation.epoch_rows(tracked.epochs), hide_index=True, key="overview.epochs")
    for n, epoch in enumerate(tracked.epochs):
        rows = formation.change_rows(epoch)
        if not rows:
            continue
        label = formation.epoch_label(tracked.epochs, epoch)
        with st.expander(f"{label} ({formation.span_text(epoch)}): {len(epoch.added)} edges added, "
                         f"{len(epoch.dropped)} dropped"):
            st.dataframe(rows, hide_index=True, key=f"overview.epoch_changes.{n}")


def trust_section(tracked) -> None:
    """The library's lines on the trust checks; a warning naming the remedies where a step is poor."""
    if not tracked.trust_lines:
        return
    st.subheader("How far to trust the scores")
    st.text("\n".join(line.rstrip() for line in tracked.trust_lines))
    if any(r.poor for r in tracked.trust):
        st.warning(ui.md(tracked.trust_lines[-1].strip()), icon=":material/warning:")


def leading_section(tracked) -> None:
    """Per phase change of the metric (or test loss): the measures whose own change started earlier."""
    if not tracked.leading:
        return
    st.subheader("Leading indicators")
    st.caption("A measure's own change starts at the first step from which it stays 10% of the way toward where it "
               "is at the end of the target's change; done = within 10% of it.")
    for n, x in enumerate(tracked.leading):
        st.markdown(f"**{ui.md(formation.lead_title(x))}**")
        rows = formation.lead_rows(x)
        if rows:
            st.dataframe(rows, hide_index=True, key=f"overview.leading.{n}")


if tracked is not None:
    if tracked.explained is not None and tracked.circuit is not None:
        with ui.guard("show which steps have a circuit"):
            formation_section(tracked)
        with ui.guard("list the epochs of the mechanism"):
            epochs_section(tracked)
    with ui.guard("show the trust checks"):
        trust_section(tracked)
    with ui.guard("draw the loss and metric curves"):
        names = [n for n in tracked.curves if not n.startswith("circuit/")]
        if names:
            st.subheader("Over training")
            st.plotly_chart(charts.tidy_log_steps(figures.metric_curves(tracked, names)), key="overview.curves")
        # Every phase shaded above is listed: each curve's own windows are shaded on it, so a
        # metric-and-loss-only table left the windows of early_loss and the other measures unnamed.
        phases = [p for p in tracked.phases if p.curve in names]
        if phases:
            st.caption("Phase changes of every curve above (shaded on it); circuit changes are the stable circuit's")
            st.dataframe([{"curve": p.curve, "step": p.step, "window": f"{p.start_step} .. {p.end_step}",
                           "direction": p.direction, "before": round(p.before, 4), "after": round(p.after, 4),
                           "edges added": p.circuit.get("edges_added"), "edges removed": p.circuit.get("edges_removed")}
                          for p in phases], hide_index=True, key="overview.phases")
    with ui.guard("list the leading indicators"):
        leading_section(tracked)
    with ui.guard("draw circuit size and faithfulness"):
        if tracked.circuit is None:
            st.info("This study has no circuits yet: sweep it with a circuit method (e.g. `--method eap`) "
                    "to see circuit size, faithfulness and similarity here.")
        else:
            st.subheader("The stable circuit over steps")
            fig = charts.tidy_log_steps(charts.legend_per_row(figures.circuit_evolution(tracked)))
            faith = tracked.curves.get("circuit/faithfulness")
            if faith is not None:  # read against 0 and 1, not zoomed into the noise
                fig.update_yaxes(range=list(charts.honest_range(faith)), row=2, col=1)
            st.plotly_chart(fig, key="overview.circuit")

with ui.guard("show the provenance"), st.expander("Provenance"):
    st.json(dict(study.provenance), expanded=False)
