"""Shared page helpers: the study in use, settings <-> URL, errors shown as messages, safe text.

Strings from files (prompts, tokens, names, provenance) are shown through ``st.text``,
``st.dataframe``/``st.json`` or plotly labels escaped with ``plain``: never as markdown or HTML.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st

from circuits.errors import CircuitsError

from . import data
from .charts import plain  # noqa: F401 - re-exported for pages
from .state import Settings, gaps_line, launch_study, snap_step, study_locked, writing_line

SESSION_KEY = "app.settings"


def settings() -> Settings:
    """This run's settings, from the URL (restored from the session if a page switch cleared it)."""
    params = st.query_params.to_dict()
    if not params and SESSION_KEY in st.session_state:
        current: Settings = st.session_state[SESSION_KEY]
        st.query_params.from_dict(current.to_query())
        return current
    current = Settings.from_query(params, default_study=launch_study(), allow_study=not study_locked())
    st.session_state[SESSION_KEY] = current
    if current.notes and params != current.to_query():
        # A value was ignored (its note says so): the URL drops it too, so URL and view agree.
        st.query_params.from_dict(current.to_query())
    return current


def update(**changes) -> Settings:
    """Change settings and mirror them in the URL (only the keys that differ are written)."""
    current: Settings = st.session_state.get(SESSION_KEY) or settings()
    new = current.with_(**changes)
    st.session_state[SESSION_KEY] = new
    query = new.to_query()
    if st.query_params.to_dict() != query:
        # One write, so one browser history entry per change (key by key would push one each,
        # and Back would step through half-made URLs).
        st.query_params.from_dict(query)
    return new


def lead(values: dict[str, object]) -> None:
    """Set widgets (session-state key -> value) to what the URL says, at every full run of a page.

    The URL leads: a widget's change writes the URL in its callback, before the page runs, so
    here the two agree unless the URL changed outside the app (Back/Forward, an edited or shared
    link), and then the URL wins. Keeping a widget's remembered value instead (setting it only
    when absent) is what made Back change the URL but not the view."""
    for key, value in values.items():
        st.session_state[key] = value


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show a failure while doing ``what`` as one message in the page, never a traceback."""
    try:
        yield
    except CircuitsError as err:
        st.error(f"Could not {what}: {md(err)}", icon=":material/error:")
    except Exception as err:  # noqa: BLE001 - the page must keep serving the rest
        st.error(f"Could not {what}: {md(type(err).__name__)}: {md(err)}", icon=":material/error:")


_PUNCTUATION = set("\\`*_{}[]()#+-.!|<>~$:&\"'=^%@/;,?")


def md(text: object) -> str:
    """Text from a file, escaped for a markdown slot (st.error, st.caption): shown as typed."""
    return "".join("\\" + ch if ch in _PUNCTUATION else ch for ch in str(text))


class NoStudy(Exception):
    """Raised to stop a page that cannot show anything (the message is already on screen)."""


def open_current(s: Settings):
    """(study, stamp) for the settings' study, or a message in the page and NoStudy."""
    if not s.study:
        st.info("No study selected. Start the app with `circuits app STUDY`, or add `?study=PATH` to the URL.")
        raise NoStudy
    try:
        stamp = data.stamp(s.study)
        study = data._open(s.study, stamp)
    except Exception as err:  # noqa: BLE001
        message = str(err) if isinstance(err, CircuitsError) else f"{type(err).__name__}: {err}"
        st.error(f"Could not open the study at {md(repr(s.study))}: {md(message)}", icon=":material/error:")
        raise NoStudy from None
    writing = data.writing_steps(s.study)
    gaps = gaps_line(list(study.steps), damaged(study), data.expected_steps(study), writing)
    if gaps:
        st.warning(md(gaps), icon=":material/report:")
    if writing and study.steps:
        st.caption(md(writing_line(writing)))
    if not study.steps:
        st.warning("This study has no complete steps yet. A sweep may still be writing it: "
                   "new steps appear here on the next rerun.", icon=":material/hourglass_empty:")
        raise NoStudy
    return study, stamp


def damaged(study) -> dict[int, str]:
    """Steps whose shard is there but unreadable -> why (the Study reader's ``problems``)."""
    return dict(getattr(study, "problems", {}) or {})


def missing(study) -> set[int]:
    """Steps the sweep selected with neither a shard nor a damaged one (empty when not recorded)."""
    expected = data.expected_steps(study)
    if expected is None:
        return set()
    return set(expected) - set(study.steps) - set(damaged(study))


def correct(note: str | None, **changes) -> None:
    """A value from the URL was out of range: write the value shown back to the URL and say,
    in one line, what was asked and what is shown (``note``, from the ``state.snap_*`` rules).
    Nothing happens when ``note`` is None."""
    if note is None:
        return
    update(**changes)
    st.info(md(note), icon=":material/auto_fix_high:")


def step_from_url(study, steps: list[int], s: Settings, what: str = "step") -> int:
    """The step the URL asks for, corrected (URL and note) when the study cannot show it."""
    step, note = snap_step(steps, s.step, damaged(study), missing(study), what)
    correct(note, step=step)
    return step


def open_page(title: str, small: bool = False):
    """Every page's start: title (``small``: a subheader, for a page that must fit one screen),
    settings from the URL, the study; stops the page when none.

    Returns (settings, study, stamp).
    """
    if small:
        st.subheader(title)
    else:
        st.title(title)
    s = settings()
    try:
        study, stamp = open_current(s)
    except NoStudy:
        st.stop()
    return s, study, stamp


def circuit_stack_or_stop(path: str, stamp, missing: str):
    """The study's circuits stacked over steps; ``missing`` is shown (and the page stopped) without them."""
    stack = None
    with guard("read the circuits"):
        stack = data.circuit_stack(path, stamp)
        if stack is None:
            st.info(missing)
    if stack is None:
        st.stop()
    return stack
