"""The app's state in one dataclass, mirrored in the URL so that a view can be shared.

``Settings.from_query`` reads ``st.query_params`` (strings, possibly hand-edited or stale):
anything unparsable is dropped with a note instead of failing. ``to_query`` writes it back.
The page is in the URL path (``st.navigation`` url_path), the rest in query parameters:
``study``, ``step``, ``base`` (Compare's earlier step), ``mode``, ``threshold``, ``top_n``,
``node``, ``example``, ``detector``, ``speed`` (play's seconds per step), ``log`` (log step axis).

The URL leads: every full run of a page sets its widgets from these settings (a widget's
change writes the URL first, in its callback), so Back/Forward, a reload or an edited link
show exactly what the URL says (``ui.lead``).

A value that parses but is out of range for the study (a step it lacks, an example past the
last, a node the model has not) is corrected by the page: the ``snap_*`` functions below give
the value shown and a one-line note saying what was asked and what is shown, and
``ui.correct`` writes the shown value back to the URL with that note.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from circuits.errors import CircuitsError

from .graph_view import parse_node

MODES = ("circuit", "full", "threshold", "top-n", "key")  # circuit: the stable circuit; full: the full-data one
SPEEDS = (0.5, 1.0, 2.0)  # play: seconds per step
MODE_LABELS = {"circuit": "stable circuit", "full": "full-data circuit", "threshold": "|score| >= threshold",
               "top-n": "top n by |score|", "key": "key edges"}
# The launcher sets this when the server listens beyond loopback: the URL may then not
# point the app at another folder on this machine.
LOCK_ENV = "CIRCUITS_APP_LOCK_STUDY"
STUDY_ENV = "CIRCUITS_APP_STUDY"


@dataclass(frozen=True)
class Settings:
    """What the user is looking at: study, step, edge selection, selected node, example."""

    study: str | None = None
    step: int | None = None
    base: int | None = None  # Compare: the earlier step (``step`` is the later one)
    mode: str = "circuit"
    threshold: float | None = None  # None: the page's default (the circuit's smallest |score|)
    top_n: int = 50
    node: str | None = None
    example: int = 0
    detector: str | None = None
    speed: float = 1.0  # play: seconds per step, one of SPEEDS
    log: bool = False  # the formation timeline's step axis: linear unless asked
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_query(cls, params: Mapping[str, str], default_study: str | None = None,
                   allow_study: bool = True) -> Settings:
        """Parse query parameters; bad values are dropped and described in ``notes``."""
        notes: list[str] = []
        values: dict = {"study": default_study}
        study = params.get("study")
        if study:
            if allow_study or study == default_study:
                values["study"] = study
            else:
                notes.append("this server shows only the study it was started on; ignoring ?study=")
        for name, parse in (("step", int), ("base", int), ("threshold", float), ("top_n", int), ("example", int)):
            raw = params.get(name)
            if raw is None or raw == "":
                continue
            try:
                value = parse(raw)
            except ValueError:
                notes.append(f"ignoring ?{name}={raw!r}: not a number")
                continue
            if name in ("top_n", "example") and value < 0 or name == "threshold" and not value >= 0:
                notes.append(f"ignoring ?{name}={raw!r}: must be >= 0")
                continue
            values[name] = value
        mode = params.get("mode")
        if mode:
            if mode in MODES:
                values["mode"] = mode
            else:
                notes.append(f"ignoring ?mode={mode!r}: expected one of {', '.join(MODES)}")
        node = params.get("node")
        if node:
            try:
                values["node"] = parse_node(node).name
            except CircuitsError as err:
                notes.append(f"ignoring ?node: {err}")
        detector = params.get("detector")
        if detector:
            values["detector"] = detector  # checked against the study's detectors by the Heads page
        speed = params.get("speed")
        if speed:
            try:
                values["speed"] = snap_speed(float(speed))
            except ValueError:
                notes.append(f"ignoring ?speed={speed!r}: expected one of {', '.join(f'{x:g}' for x in SPEEDS)}")
        log = params.get("log")
        if log:
            if log.lower() in FLAGS:
                values["log"] = FLAGS[log.lower()]
            else:
                notes.append(f"ignoring ?log={log!r}: expected 1 or 0")
        return cls(**values, notes=tuple(notes))

    def to_query(self) -> dict[str, str]:
        """Query parameters for this view (defaults left out, so URLs stay short)."""
        default = Settings()
        out = {}
        for f in fields(self):
            if f.name == "notes":
                continue
            value = getattr(self, f.name)
            if value is not None and value != getattr(default, f.name):
                out[f.name] = str(int(value)) if isinstance(value, bool) else str(value)  # log=1
        return out

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)


FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def snap_speed(wanted: float) -> float:
    """``wanted`` when it is one of SPEEDS; ValueError otherwise (the URL's value is then ignored)."""
    for speed in SPEEDS:
        if abs(speed - wanted) < 1e-9:
            return speed
    raise ValueError(wanted)


def launch_study() -> str | None:
    """The study given on the command line (``streamlit run app/main.py -- --study PATH``) or env."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--study", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.study or os.environ.get(STUDY_ENV) or None


def study_locked() -> bool:
    return os.environ.get(LOCK_ENV, "") not in ("", "0")


# ---------------------------------------------------------------- corrections (pure)


def _steps_text(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps)


def nearest(options: list[int], wanted: int) -> int:
    """The option nearest to ``wanted`` (the smaller one on a tie)."""
    return min(options, key=lambda x: (abs(x - wanted), x))


def snap_step(steps: list[int], wanted: int | None, damaged: Mapping[int, str] | None = None,
              missing: set[int] | frozenset[int] = frozenset(), what: str = "step") -> tuple[int, str | None]:
    """(the step to show, a note or None) for a step asked in the URL.

    None asks for the last step (no note). A step the study lacks snaps to the nearest one it
    has, the note saying why it is not there: its shard is damaged, its shard is missing, or it
    is not a step of this study at all.
    """
    if not steps:
        raise ValueError("snap_step: no steps to choose from")
    if wanted is None:
        return steps[-1], None
    if wanted in steps:
        return wanted, None
    shown = nearest(steps, wanted)
    if damaged and wanted in damaged:
        why = f"{what} {wanted}'s shard is damaged"
    elif wanted in missing:
        why = f"{what} {wanted}'s shard is missing"
    elif wanted < steps[0] or wanted > steps[-1]:
        why = f"{what} {wanted} is outside this study (steps {steps[0]} to {steps[-1]})"
    else:
        why = f"{what} {wanted} is not in this study"
    return shown, f"{why}; showing {shown}, the nearest"


def snap_int(name: str, wanted: int, low: int, high: int) -> tuple[int, str | None]:
    """(``wanted`` clamped to [low, high], a note when it had to be)."""
    shown = min(max(wanted, low), high)
    if shown == wanted:
        return wanted, None
    return shown, f"{name} {wanted} is out of range ({low} to {high}); showing {shown}"


def snap_node(wanted: str | None, nodes: list[str]) -> tuple[str | None, str | None]:
    """(the node, or None when this model's graph has no such node; a note then)."""
    if wanted is None or wanted in nodes:
        return wanted, None
    return None, f"node {wanted} is not in this model's graph; no node selected"


def snap_choice(name: str, wanted: str | None, options: list[str]) -> tuple[str | None, str | None]:
    """(``wanted`` when it is an option, else the first option; a note then)."""
    if not options:
        return None, None
    if wanted is None or wanted in options:
        return wanted or options[0], None
    return options[0], f"{name} {wanted!r} is not in this study ({', '.join(options)}); showing {options[0]}"


def order_pair(earlier: int, later: int) -> tuple[int, int, str | None]:
    """Compare's pair with the earlier step first; a note when it was asked the other way round
    or both are the same step."""
    if earlier > later:
        return later, earlier, (f"step {earlier} comes after step {later}: comparing {later} (earlier) "
                                f"with {earlier} (later)")
    if earlier == later:
        return earlier, later, f"both steps are {earlier}: nothing can be added or removed between them"
    return earlier, later, None


def gaps_line(landed: list[int], damaged: Mapping[int, str], expected: list[int] | None = None,
              writing: set[int] | frozenset[int] = frozenset()) -> str | None:
    """One line naming the steps the study should hold but cannot show, and why, or None.

    ``damaged``: steps whose shard is there but unreadable; ``expected``: the steps the sweep
    selected, when the study records them (a selected step with neither a shard nor a writer
    is missing); ``writing``: steps a live sweep is writing now (not a gap: said elsewhere).
    """
    reasons = {step: "shard damaged" for step in damaged if step not in writing}
    if expected is not None:
        have = set(landed) | set(damaged) | set(writing)
        reasons |= {step: "shard missing" for step in expected if step not in have}
    if not reasons:
        return None
    listed = ", ".join(f"{step} ({why})" for step, why in sorted(reasons.items()))
    them = "it" if len(reasons) == 1 else "them"
    return f"Left out: {'step' if len(reasons) == 1 else 'steps'} {listed}; sweep the study again to replace {them}."


def writing_line(writing: set[int] | frozenset[int]) -> str | None:
    """The steps a live sweep is writing now, or None."""
    if not writing:
        return None
    return (f"A sweep is writing step {_steps_text(sorted(writing))} now: new steps appear here as their "
            "shards land (any rerun picks them up).")


def threshold_default(scores, stable, full) -> float:
    """Threshold mode's starting value at one step: the smallest |score| in the stable circuit,
    or in the full-data circuit when the stable one is empty or absent (0 when both are)."""
    import numpy as np

    for mask in (stable, full):
        if mask is None:
            continue
        chosen = np.abs(np.asarray(scores)[np.asarray(mask, dtype=bool)])
        chosen = chosen[np.isfinite(chosen)]
        if chosen.size:
            return float(chosen.min())
    return 0.0
