"""The formation account as the pages show it: which steps have a circuit, the epochs of the
mechanism, the leading indicators, how far to trust the scores. Pure (no Streamlit): the pages
call these on what ``circuits.tracking`` and ``circuits.discovery.trust`` compute, and the
tests call them on hand-made values.

Wording follows ``circuits summary`` (``circuits.tracking.summary_text``); the trust lines are
the library's own (``circuits.discovery.trust.trust_text``), not re-worded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from circuits.tracking import CircuitSeries, Epoch, Explanandum, LeadingIndicators, Role


def _num(x: float, spec: str) -> str:
    return "n/a" if not np.isfinite(x) else format(x, spec)


# ---------------------------------------------------------------- something to explain


def rule_text(e: Explanandum) -> str:
    """The rule a step's circuit must meet: '|z| >= 3, reproducibility >= 0.6'."""
    parts = [f"|z| >= {e.gap_z:g}"]
    if np.isfinite(e.reproducibility).any():
        parts.append(f"reproducibility >= {e.reproducible:g}")
    if e.gap_floor:
        parts.append(f"gap >= {e.gap_floor:.0%} of the largest")
    return ", ".join(parts)


def failed_text(e: Explanandum, i: int) -> str:
    """Which part of the rule step ``i`` misses: 'z 2.1 < 3; reproducibility 0.30 < 0.6'."""
    misses = []
    if not abs(e.z[i]) >= e.gap_z:
        misses.append(f"|z| {abs(float(e.z[i])):.1f} < {e.gap_z:g}")
    repro = float(e.reproducibility[i])
    if np.isfinite(e.reproducibility).any() and not np.nan_to_num(repro, nan=0.0) >= e.reproducible:
        misses.append(f"reproducibility {_num(repro, '.2f')} < {e.reproducible:g}")
    if not e.share[i] >= e.gap_floor:
        misses.append(f"gap {e.share[i]:.1%} of the largest < {e.gap_floor:.0%}")
    return "; ".join(misses)


def step_status(e: Explanandum | None, i: int) -> tuple[bool, str]:
    """(has a circuit, one line for the page) at step index ``i``; no rule: (True, '')."""
    if e is None:
        return True, ""
    if bool(e.has_circuit[i]):
        return True, f"a circuit to explain: {e.gap_text(i)}"
    yet = " yet" if not np.asarray(e.has_circuit[:i]).any() else ""
    return False, f"no circuit{yet}: {e.gap_text(i)}; below the rule ({failed_text(e, i)})"


def step_rows(steps: list[int], e: Explanandum, epochs: list[Epoch]) -> list[dict[str, Any]]:
    """One row per step: has a circuit, gap +- se, z, share of the largest gap, reproducibility, epoch."""
    rows = []
    for i, step in enumerate(steps):
        epoch = epoch_of(epochs, step)
        rows.append({
            "step": step, "circuit": "yes" if e.has_circuit[i] else "no",
            "gap": float(e.gap[i]), "+- se": float(e.gap_se[i]), "z": _finite(e.z[i]),
            "share of largest gap": float(e.share[i]), "reproducibility": _finite(e.reproducibility[i]),
            "epoch": None if epoch is None else epoch_label(epochs, epoch),
        })
    return rows


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


# ---------------------------------------------------------------- epochs of the mechanism


def epoch_of(epochs: list[Epoch], step: int) -> Epoch | None:
    return next((e for e in epochs if e.start <= step <= e.end), None)


def epoch_label(epochs: list[Epoch], epoch: Epoch) -> str:
    """'E1 no circuit yet', 'E2 21 edges', 'E3 +19 -3 edges': short enough for a band on a timeline."""
    n = epochs.index(epoch) + 1
    if not epoch.has_circuit:
        return f"E{n} no circuit" + (" yet" if n == 1 else "")
    if n == 1 or not any(e.has_circuit for e in epochs[: n - 1]):
        return f"E{n} {epoch.n_edges} edges"
    return f"E{n} +{len(epoch.added)} -{len(epoch.dropped)} edges"


def span_text(epoch: Epoch) -> str:
    return f"step {epoch.start}" if epoch.start == epoch.end else f"steps {epoch.start}-{epoch.end}"


def epoch_rows(epochs: list[Epoch]) -> list[dict[str, Any]]:
    """One row per epoch: its steps, whether it has a circuit, its typical circuit's size and change."""
    return [{"epoch": epoch_label(epochs, e), "steps": span_text(e), "n steps": e.n_steps,
             "circuit": "yes" if e.has_circuit else "no", "edges": e.n_edges if e.has_circuit else None,
             "similarity >=": e.similarity, "added": len(e.added), "dropped": len(e.dropped)}
            for e in epochs]


def change_rows(epoch: Epoch) -> list[dict[str, Any]]:
    """The edges that set an epoch apart from the one before: added, then dropped, by mean share of the gap."""
    return ([{"edge": d["edge"], "change": "added", "mean share of the gap": d["mean_share"]} for d in epoch.added]
            + [{"edge": d["edge"], "change": "dropped", "mean share of the gap (epoch before)": d["mean_share"]}
               for d in epoch.dropped])


# ---------------------------------------------------------------- leading indicators


def lead_title(x: LeadingIndicators) -> str:
    """'metric rise at step 450 (window 400-500, own change from 425): 3 measures started earlier'."""
    count = "no measure started earlier" if not x.indicators else (
        f"{len(x.indicators)} measure{'s' if len(x.indicators) != 1 else ''} started earlier")
    return (f"{x.target} {x.direction} at step {x.step} (window {x.start_step}-{x.end_step}, "
            f"own change from {x.onset}): {count}")


def lead_rows(x: LeadingIndicators) -> list[dict[str, Any]]:
    return [{"measure": d["measure"], "change from": d["onset"],
             "done by": d["done"], "still moving at the target's start": bool(d["still_moving"]),
             "lead (steps)": d["lead_steps"], "lead (tokens)": d["lead_tokens"]} for d in x.indicators]


# ---------------------------------------------------------------- roles


def role_text(role: Role, circuit: CircuitSeries | None = None) -> str:
    """'a1.h2 induction: 0.05 -> 0.93, formed at step 450 (after 425)' and, given the tracked (stable)
    circuit, '; in the stable circuit from step 425' or '; not in the final stable circuit'."""
    formed = "never for good" if role.formed is None else f"step {role.formed}"
    after = "" if role.after_step is None else f" (after {role.after_step})"
    line = f"{role.head} {role.kind.replace('_', ' ')}: {role.start:.3g} -> {role.end:.3g}, formed at {formed}{after}"
    if circuit is not None:
        since = dict(circuit.emergence_order()).get(role.head)
        line += ("; not in the final stable circuit" if since is None else f"; in the stable circuit from step {since}")
    return line


# ---------------------------------------------------------------- edges


@dataclass(frozen=True)
class EdgeStats:
    """A step's bootstrap per edge ([n_forward, n_backward]); None where the study has none."""

    inclusion: np.ndarray | None
    score_se: np.ndarray | None


def stats_at(inclusion: np.ndarray | None, score_se: np.ndarray | None, i: int) -> EdgeStats:
    return EdgeStats(None if inclusion is None else inclusion[i], None if score_se is None else score_se[i])


# ---------------------------------------------------------------- how far to trust the scores


def report_at(reports: list[Any], step: int) -> Any | None:
    """The trust report (``circuits.discovery.trust.TrustReport``) checked at ``step``, if any."""
    return next((r for r in reports if r.step == step), None)


def trust_lines_at(report: Any, settings: dict[str, Any]) -> list[str]:
    """The summary's lines on one checked step, e.g. 'step 1000: EAP-IG(5) vs exact: rho 0.66 signed,
    0.94 on |score|, top-10 overlap 9/10, ...' and, when poor, the line naming the remedies.
    Worded by the library (``trust_text``); only the header is left out."""
    from circuits.discovery.trust import trust_text

    return [line.strip() for line in trust_text([report], **settings)[1:]]


# ---------------------------------------------------------------- the formation timeline's lanes


@dataclass(frozen=True)
class Span:
    """One window on the timeline: a phase change, an epoch, a stage; ``step`` is where a click goes."""

    label: str
    start: int
    end: int
    step: int


@dataclass(frozen=True)
class Lane:
    """One row of spans: a curve's phase changes, the mechanism epochs, or another stage list."""

    name: str
    spans: tuple[Span, ...]


# Tracking lists with windows that are not stages of training: the leading indicators restate the
# phases of their target (drawn already), with the measures that moved first.
NOT_STAGES = frozenset({"leading"})
EXTENTS = (("start_step", "end_step"), ("start", "end"))  # (start, end) attribute names, in that order


def curve_title(curve: str) -> str:
    """'metric', 'early loss', 'induction a1.h1': a curve's name for a lane or an axis."""
    name = curve.removeprefix("progress/").removeprefix("heads/")
    return name.replace("/", " ").replace("_", " ")


def _extent(item: Any) -> tuple[int, int] | None:
    for start, end in EXTENTS:
        if hasattr(item, start) and hasattr(item, end):
            return int(getattr(item, start)), int(getattr(item, end))
    return None


def _phase_lanes(phases: list[Any]) -> list[Lane]:
    """One lane per curve with phase changes: metric, loss, then the rest as tracked."""
    by_curve: dict[str, list[Span]] = {}
    for p in phases:
        by_curve.setdefault(p.curve, []).append(Span(p.direction, int(p.start_step), int(p.end_step), int(p.step)))
    first = [c for c in ("metric", "loss") if c in by_curve]
    order = first + [c for c in by_curve if c not in first]
    return [Lane(f"{curve_title(c)} phases", tuple(by_curve[c])) for c in order]


def _epoch_lane(epochs: list[Epoch]) -> Lane:
    return Lane("mechanism epochs", tuple(Span(epoch_label(epochs, e), int(e.start), int(e.end), int(e.start))
                                          for e in epochs))


def _stage_lane(name: str, items: list[Any]) -> Lane | None:
    """A list of anything with a window (``start_step``/``end_step`` or ``start``/``end``)."""
    spans = []
    for k, item in enumerate(items):
        extent = _extent(item)
        if extent is None:
            return None
        label = next((str(getattr(item, a)) for a in ("label", "kind", "direction", "name") if
                      getattr(item, a, None) is not None), f"{k + 1}")
        step = getattr(item, "step", None)
        spans.append(Span(label, extent[0], extent[1], int(step) if step is not None else extent[0]))
    return Lane(name.replace("_", " "), tuple(spans))


def stages_lanes(curve: str, stages: Any) -> list[Lane]:
    """A curve's stages (``circuits.stages.Stages``): its pieces (rise, fall, plateau), then its
    boundaries (peak, levels off, ...) over their windows; a click on a boundary goes to its step."""
    pieces = tuple(Span(s.kind, int(s.start_step), int(s.end_step), int(s.start_step)) for s in stages.stages)
    turns = tuple(Span(b.kind, int(b.window_start), int(b.window_end), int(b.step)) for b in stages.boundaries)
    return [lane for lane in (Lane(f"{curve} stages", pieces), Lane(f"{curve} boundaries", turns)) if lane.spans]


def lanes(tracking: Any) -> list[Lane]:
    """Every list of windows the tracking result offers, as lanes: each curve's phase changes
    (metric, loss, the progress measures such as early_loss, the top head of each detector), the
    mechanism epochs, then any other list of windowed items it holds (e.g. LLC stages), in its
    field order: a new list in ``circuits.tracking.Tracking`` shows up without a change here."""
    from dataclasses import fields, is_dataclass

    out = _phase_lanes(list(getattr(tracking, "phases", []) or []))
    epochs = list(getattr(tracking, "epochs", []) or [])
    if epochs:
        out.append(_epoch_lane(epochs))
    if not is_dataclass(tracking):
        return out
    for f in fields(tracking):
        if f.name in {"phases", "epochs"} | NOT_STAGES:
            continue
        value = getattr(tracking, f.name)
        if hasattr(value, "stages") and hasattr(value, "boundaries"):  # circuits.stages.Stages (the LLC's)
            out += stages_lanes(f.name.removesuffix("_stages"), value)
        elif isinstance(value, (list, tuple)) and value:
            lane = _stage_lane(f.name, list(value))
            if lane is not None:
                out.append(lane)
    return out


def clicked_step(points: list[dict[str, Any]], targets: list[list[int] | None]) -> int | None:
    """The step a click on the timeline asks for: the first clicked point's target.

    ``points`` are plotly's selected points (``curve_number``, ``point_index``); ``targets[c][i]``
    is the step point ``i`` of trace ``c`` stands for (a phase window's points all stand for the
    phase's step). Traces that are not clickable have None. None when nothing usable was clicked.
    """
    for point in points:
        curve, index = point.get("curve_number"), point.get("point_index", point.get("point_number"))
        if curve is None or index is None or not 0 <= int(curve) < len(targets):
            continue
        chosen = targets[int(curve)]
        if chosen is not None and 0 <= int(index) < len(chosen):
            return int(chosen[int(index)])
    return None
