"""The app's state in one dataclass, mirrored in the URL so that a view can be shared.

``Settings.from_query`` reads ``st.query_params`` (strings, possibly hand-edited or stale):
anything unparsable is dropped with a note instead of failing. ``to_query`` writes it back.
The page is in the URL path (``st.navigation`` url_path), the rest in query parameters:
``study``, ``step``, ``mode``, ``threshold``, ``top_n``, ``node``, ``example``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from circuits.errors import CircuitsError

from .graph_view import parse_node

MODES = ("circuit", "full", "threshold", "top-n")  # circuit: the stable circuit; full: the full-data one
MODE_LABELS = {"circuit": "stable circuit", "full": "full-data circuit", "threshold": "|score| >= threshold",
               "top-n": "top n by |score|"}
# The launcher sets this when the server listens beyond loopback: the URL may then not
# point the app at another folder on this machine.
LOCK_ENV = "CIRCUITS_APP_LOCK_STUDY"
STUDY_ENV = "CIRCUITS_APP_STUDY"


@dataclass(frozen=True)
class Settings:
    """What the user is looking at: study, step, edge selection, selected node, example."""

    study: str | None = None
    step: int | None = None
    mode: str = "circuit"
    threshold: float = 0.0
    top_n: int = 50
    node: str | None = None
    example: int = 0
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
        for name, parse in (("step", int), ("threshold", float), ("top_n", int), ("example", int)):
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
                out[f.name] = str(value)
        return out

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)


def launch_study() -> str | None:
    """The study given on the command line (``streamlit run app/main.py -- --study PATH``) or env."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--study", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.study or os.environ.get(STUDY_ENV) or None


def study_locked() -> bool:
    return os.environ.get(LOCK_ENV, "") not in ("", "0")
