"""``circuits llc-calibrate``: SGLD step size x localisation on one checkpoint, traces and a table.

An LLC estimate means nothing until the sampler is calibrated (devinterp's calibration
guidance): the loss trace of each chain should rise from the loss at w* and level off after
burn-in (not keep climbing: lr too large or localisation too weak, the chain drifts away; not
still settling: lr too small for the draws), stay finite, and give llc > 0. This sweeps a small
grid of ``lr`` x ``localization`` at one step, draws every setting's traces (one panel per
setting, a line per chain) and prints a table with the rule applied (:func:`circuits.llc.diagnose`)
and the recommended setting: among the healthy ones, the weakest localisation (a strong pull
toward w* measures the prior more than the landscape: the estimate shrinks as gamma grows), then
the largest lr (the fastest to level off, so the fewest draws are needed), then the smaller
standard error.

Drawing lives here (plotly, loaded lazily), apart from ``circuits.llc``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from circuits.llc import MAX_DRIFT, LLCEstimate, LLCSettings

LRS = (1e-4, 3e-4, 1e-3)
LOCALIZATIONS = (100.0, 300.0, 1000.0)


@dataclass
class Calibration:
    """Every setting's estimate at one step, and the one recommended (None: no setting is healthy)."""

    step: int
    estimates: list[LLCEstimate]
    recommended: int | None  # index into ``estimates``

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, e in enumerate(self.estimates):
            out.append({"lr": e.settings.lr, "localization": e.settings.localization, "llc_mean": e.llc_mean,
                        "llc_se": e.llc_se, "rise": float(e.trace_rise.mean()),
                        "max_abs_drift": float(np.abs(e.trace_drift).max()), "healthy": e.healthy,
                        "recommended": i == self.recommended})
        return out


def recommend(estimates: list[LLCEstimate]) -> int | None:
    """The healthy setting with the weakest localisation, then the largest lr, then the smaller standard error."""
    healthy = [i for i, e in enumerate(estimates) if e.healthy]
    if not healthy:
        return None
    return min(healthy, key=lambda i: (estimates[i].settings.localization, -estimates[i].settings.lr,
                                       estimates[i].llc_se))


def calibrate(manifest, step: int, task_name: str = "induction", base: LLCSettings | None = None,
              lrs: tuple[float, ...] = LRS, localizations: tuple[float, ...] = LOCALIZATIONS,
              device: str = "cpu") -> Calibration:
    """Estimate the LLC at ``step`` for every ``lr`` x ``localization`` (the other settings from ``base``)."""
    import circuits
    from circuits.llc import estimate as run_estimate
    from circuits.llc import llc_data, sampling_module

    base = base or LLCSettings()
    model = circuits.load(manifest, step, device)
    task = circuits.make_task(task_name, model)
    sampled = sampling_module(model, manifest, step, device)
    data = llc_data(manifest, task, base)
    estimates = [run_estimate(sampled, data, replace(base, lr=lr, localization=gamma), device)
                 for gamma in localizations for lr in lrs]
    return Calibration(step, estimates, recommend(estimates))


def table_text(cal: Calibration) -> str:
    s = cal.estimates[0].settings
    lines = [f"llc-calibrate at step {cal.step}: {s.chains} chains x {s.draws} draws after {s.burnin} burn-in, "
             f"batch {s.batch_size}, nbeta {s.inverse_temperature:.3g}, data {cal.estimates[0].source}",
             f"rule: healthy = every trace finite, rise after burn-in > 0 (llc > 0), and |drift| <= {MAX_DRIFT:g} "
             "(last half of the draws vs the first half, as a share of the rise: the trace has levelled off); "
             "recommended = the healthy setting with the weakest localization (least pull toward w*), then the "
             "largest lr (levels off fastest), then the smaller standard error",
             f"{'lr':>8} {'gamma':>7} {'llc':>8} {'+- se':>7} {'rise':>7} {'|drift|':>8}  verdict"]
    for row in cal.rows():
        verdict = ("recommended" if row["recommended"] else "healthy") if row["healthy"] else "not flat / diverging"
        lines.append(f"{row['lr']:>8.0e} {row['localization']:>7g} {row['llc_mean']:>8.3f} {row['llc_se']:>7.3f} "
                     f"{row['rise']:>7.3f} {row['max_abs_drift']:>8.3f}  {verdict}")
    if cal.recommended is None:
        lines.append("no setting is healthy: widen the grid (smaller lr, stronger localization) or add burn-in / draws")
    else:
        r = cal.estimates[cal.recommended].settings
        lines.append(f"use: --llc lr={r.lr:g},localization={r.localization:g},chains={r.chains},draws={r.draws},"
                     f"burnin={r.burnin},batch_size={r.batch_size}")
    return "\n".join(lines)


def trace_figure(cal: Calibration):
    """One panel per setting (rows: localisation, columns: lr), one line per chain; burn-in shaded."""
    from plotly.subplots import make_subplots

    lrs = sorted({e.settings.lr for e in cal.estimates})
    gammas = sorted({e.settings.localization for e in cal.estimates})
    titles = []
    for gamma in gammas:
        for lr in lrs:
            e = next(x for x in cal.estimates if x.settings.lr == lr and x.settings.localization == gamma)
            mark = " (recommended)" if cal.recommended is not None and e is cal.estimates[cal.recommended] else ""
            titles.append(f"lr {lr:g}, gamma {gamma:g}: llc {e.llc_mean:.2f} +- {e.llc_se:.2f}"
                          f"{'' if e.healthy else ' NOT FLAT'}{mark}")
    fig = make_subplots(rows=len(gammas), cols=len(lrs), subplot_titles=titles, shared_xaxes=True)
    for r, gamma in enumerate(gammas, start=1):
        for c, lr in enumerate(lrs, start=1):
            e = next(x for x in cal.estimates if x.settings.lr == lr and x.settings.localization == gamma)
            for chain, trace in enumerate(e.loss_trace):
                fig.add_scatter(y=trace, mode="lines", name=f"chain {chain}", showlegend=(r, c) == (1, 1),
                                legendgroup=f"chain {chain}", row=r, col=c)
            fig.add_hline(y=e.init_loss, line_dash="dot", line_color="black", row=r, col=c)
            if e.settings.burnin:
                fig.add_vrect(x0=0, x1=e.settings.burnin, fillcolor="rgba(128,128,128,0.15)", line_width=0,
                              row=r, col=c)
    fig.update_layout(title=f"SGLD loss traces at step {cal.step} (dotted: loss at w*; grey: burn-in)",
                      width=380 * len(lrs), height=300 * len(gammas) + 80, font_size=10)
    fig.update_annotations(font_size=10)
    return fig


def write(cal: Calibration, out: Path, png: bool = True) -> list[str]:
    """``traces.html`` (+ ``traces.png`` when kaleido is there) and ``calibration.json`` in ``out``."""
    import importlib.util

    out.mkdir(parents=True, exist_ok=True)
    fig = trace_figure(cal)
    written = [str(out / "traces.html")]
    fig.write_html(written[0], include_plotlyjs="directory", full_html=True)
    if png and importlib.util.find_spec("kaleido") is not None:  # PNG through kaleido when installed
        fig.write_image(str(out / "traces.png"), scale=2)
        written.append(str(out / "traces.png"))
    record = {"step": cal.step, "rows": cal.rows(), "settings": cal.estimates[0].settings.to_dict(),
              "traces": {f"lr={e.settings.lr:g},localization={e.settings.localization:g}": e.loss_trace.tolist()
                         for e in cal.estimates}}
    (out / "calibration.json").write_text(json.dumps(record, indent=1))
    written.append(str(out / "calibration.json"))
    return written
