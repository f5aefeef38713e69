"""Cached reads of a study, through the library's API only (no h5py here).

The Study is a ``st.cache_resource`` keyed by (path, stamp), where the stamp changes whenever
a shard lands (the mtimes of the study folder and its sub-folders: a shard is renamed into
place when complete). A study still being written is thus shown as far as it goes, and new
steps appear on the next rerun without restarting. Derived data is cached with every input
in the key: no leading-underscore arguments.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from circuits import store
from circuits.errors import CircuitsError
from circuits.tracking import Explanandum

from . import graph_view as gv
from .formation import EdgeStats, stats_at

CIRCUIT_KEYS = ("circuit/scores", "circuit/in_circuit")
# One Study object serves every browser session (cache_resource), and its shard handles are an
# LRU that reads open and close: reads from different sessions' threads take turns.
# (Serialised functions never call each other, and ``_open`` is not serialised: no deadlock
# between this lock and Streamlit's per-key cache locks.)
_READS = threading.RLock()


def _serialised(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _READS:
            return fn(*args, **kwargs)
    return wrapper


def stamp(path: str) -> float:
    """Changes whenever a file is added, renamed or rewritten in the study (one level down)."""
    root = Path(path)
    if not root.is_dir():
        return 0.0  # opening it says what is wrong
    latest = root.stat().st_mtime_ns
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                latest = max(latest, entry.stat().st_mtime_ns)
                if entry.is_dir():
                    with os.scandir(entry.path) as inner:
                        for sub in inner:
                            latest = max(latest, sub.stat(follow_symlinks=False).st_mtime_ns)
    except OSError:
        pass
    return latest / 1e9


@st.cache_resource(max_entries=8, show_spinner=False)
def _open(path: str, stamp_: float):
    import circuits

    return circuits.open_study(path)


def expected_steps(s) -> list[int] | None:
    """The steps the study's sweep selected, when its record says (``steps`` in study.json), else
    None: then a manifest step without a shard may be unselected, not reached yet, or deleted."""
    recorded = s.provenance.get("steps")
    if not isinstance(recorded, list) or not all(isinstance(x, int) for x in recorded):
        return None
    return sorted(set(recorded))


def writing_steps(path: str) -> frozenset[int]:
    """Steps whose shard a live process is writing now (its temporary file is there; not cached)."""
    return store.steps_being_written(Path(path))


def study(path: str):
    """The study at ``path``, reopened when it changed on disk; CircuitsError when unreadable."""
    return _open(path, stamp(path))


@dataclass(frozen=True)
class CircuitStack:
    """Every step's dense graph, read once per study version (shared, never mutated).

    ``circuit`` is what the pages call *the circuit*: the stable circuit (``circuit/stable``,
    edges in most bootstrap resamples) at the steps that have one by the library's rule
    (``explained``), empty elsewhere, as ``circuits.tracking.track`` tracks it. A study without
    the bootstrap (``stable`` None) falls back to the full-data circuit ``in_circuit``.
    """

    steps: tuple[int, ...]
    forward_names: tuple[str, ...]
    backward_names: tuple[str, ...]
    scores: np.ndarray  # [n_steps, n_forward, n_backward]
    in_circuit: np.ndarray  # bool, same shape: the full-data circuit
    layout: gv.Layout
    circuit: np.ndarray  # bool, same shape: the stable circuit where a step has one
    stable: np.ndarray | None = None  # bool, same shape, as stored (ungated)
    inclusion: np.ndarray | None = None  # share of resamples holding each edge
    score_se: np.ndarray | None = None  # bootstrap standard error of each score
    explained: Explanandum | None = None  # per step: is there a circuit to explain

    def stored(self, mode: str) -> np.ndarray:
        """The stored masks over steps for a stored mode: ``circuit`` (stable) or ``full`` (full data)."""
        return self.in_circuit if mode == "full" else self.circuit

    def stats(self, i: int) -> EdgeStats:
        return stats_at(self.inclusion, self.score_se, i)


def _read_owned(s, key: str, dtype) -> np.ndarray | None:
    """``key`` over steps as a read-only array we own, or None when the study lacks it."""
    if not s.has(key):
        return None
    out = np.array(s.array(key), dtype=dtype)
    out.setflags(write=False)
    return out


def _explained(s) -> Explanandum | None:
    """The library's rule on the stored numbers (default thresholds), as ``track`` applies it."""
    from circuits.tracking import explained_of

    return explained_of(s)


@st.cache_resource(max_entries=8, show_spinner=False)
@_serialised
def circuit_stack(path: str, stamp_: float) -> CircuitStack | None:
    """None when the study has no circuits yet."""
    from circuits.graph import spec_for_study

    s = _open(path, stamp_)
    if not s.steps or not all(s.has(k) for k in CIRCUIT_KEYS):
        return None
    scores = np.array(s.array("circuit/scores"), dtype=np.float32)  # a copy we own
    in_circuit = np.asarray(s.array("circuit/in_circuit"), dtype=bool)
    spec = spec_for_study(s, scores.shape[1:])
    scores[:, ~spec.valid] = np.nan  # pairs that cannot be edges are never drawn
    forward, backward = spec.forward_names, spec.backward_names
    stable = _read_owned(s, "circuit/stable", bool)
    explained = _explained(s)
    circuit = (in_circuit if stable is None else stable) & np.isfinite(scores)
    if explained is not None:
        circuit = circuit & explained.has_circuit[:, None, None]
    for arr in (scores, in_circuit, circuit):
        arr.setflags(write=False)
    return CircuitStack(tuple(int(x) for x in s.steps), tuple(forward), tuple(backward), scores,
                        in_circuit, gv.layout(list(forward), list(backward)), circuit, stable,
                        _read_owned(s, "circuit/inclusion", np.float32),
                        _read_owned(s, "circuit/score_se", np.float32), explained)


def edge_masks(stack: CircuitStack, mode: str, threshold: float, top_n: int) -> np.ndarray:
    """[n_steps, F, B] selection masks for every step (vectorised for the stored circuits)."""
    if mode in gv.STORED:
        return stack.stored(mode) & np.isfinite(stack.scores)
    return np.stack([gv.select_edges(stack.scores[i], None, mode, threshold, top_n)
                     for i in range(len(stack.steps))])


def selection_at(stack: CircuitStack, i: int, mode: str, threshold: float, top_n: int) -> np.ndarray:
    """The edges drawn at step index ``i`` for a selection."""
    return gv.select_edges(stack.scores[i], stack.stored(mode)[i], mode, threshold, top_n)


def _bundled_rest(stack: CircuitStack, i: int, mode: str, drawn: np.ndarray) -> np.ndarray | None:
    """Key-edges view: every other scored edge, to be bundled by layer pair; None otherwise."""
    if mode != "key":
        return None
    return np.isfinite(stack.scores[i]) & (stack.scores[i] != 0) & ~drawn


def graph_json(path: str, stamp_: float, step: int, mode: str, threshold: float, top_n: int,
               selected: str | None = None, width: float = gv.WIDTH, height: float = gv.HEIGHT) -> dict:
    """What the graph component draws at ``step``, diffed against the previous step, in a
    ``width`` x ``height`` drawing area, with the detector roles as badges and ``selected``
    highlighted (a shallow copy of the cached view: selecting a node recomputes nothing)."""
    return {**_graph_view(path, stamp_, step, mode, threshold, top_n, float(width), float(height)),
            "selected": selected}


# cache_resource: the dict is shared, never copied per rerun (no caller mutates it; graph_json
# adds the selected node to a shallow copy). One entry per step, selection and size, built once.
@st.cache_resource(max_entries=1024, show_spinner=False)
def _graph_view(path: str, stamp_: float, step: int, mode: str, threshold: float, top_n: int,
                width: float, height: float) -> dict:
    stack = circuit_stack(path, stamp_)
    i = stack.steps.index(step)
    current = selection_at(stack, i, mode, threshold, top_n)
    previous = prev_scores = prev_stats = None
    if i > 0:
        previous = selection_at(stack, i - 1, mode, threshold, top_n)
        prev_scores, prev_stats = stack.scores[i - 1], stack.stats(i - 1)
    graph_layout = gv.cached_layout(stack.forward_names, stack.backward_names, width, height)
    out = gv.view(graph_layout, list(stack.forward_names), list(stack.backward_names),
                  stack.scores[i], current, previous, prev_scores, None, stack.stats(i), prev_stats,
                  rest=_bundled_rest(stack, i, mode, current), roles=role_map(path, stamp_),
                  opacity_by_inclusion=mode == "circuit" and stack.inclusion is not None)
    out["step"] = step
    out["previous_step"] = stack.steps[i - 1] if i > 0 else None
    return out


def role_map(path: str, stamp_: float) -> dict[str, list[str]]:
    """Head -> the detector roles the library finds material for it (the graph's badges)."""
    out: dict[str, list[str]] = {}
    for role in roles(path, stamp_):
        out.setdefault(role.head, []).append(role.kind)
    return out


@st.cache_data(max_entries=64, show_spinner=False)
def jaccard_matrix(path: str, stamp_: float, mode: str, threshold: float, top_n: int) -> np.ndarray:
    stack = circuit_stack(path, stamp_)
    return gv.jaccard_matrix(edge_masks(stack, mode, threshold, top_n))


@st.cache_data(max_entries=256, show_spinner=False)
@_serialised
def pattern(path: str, stamp_: float, step: int, layer: int, head: int, example: int) -> np.ndarray:
    return np.asarray(_open(path, stamp_).pattern(step, layer, head, example), dtype=np.float32)


@st.cache_data(max_entries=64, show_spinner=False)
@_serialised
def tokens(path: str, stamp_: float, example: int) -> list[str]:
    return [str(t) for t in _open(path, stamp_).tokens(example)]


@st.cache_data(max_entries=64, show_spinner=False)
@_serialised
def curves(path: str, stamp_: float) -> dict[str, np.ndarray]:
    """Task metric and loss over steps (whatever of them the study holds)."""
    s = _open(path, stamp_)
    out = {}
    for name, getter in (("task metric", s.metric), ("loss", s.loss)):
        try:
            out[name] = np.asarray(getter(), dtype=float)
        except CircuitsError:  # a study without outputs still has circuits
            continue
    return out


@st.cache_data(max_entries=64, show_spinner=False)
@_serialised
def array(path: str, stamp_: float, key: str) -> np.ndarray | None:
    s = _open(path, stamp_)
    return np.asarray(s.array(key)) if s.has(key) else None


@st.cache_resource(max_entries=8, show_spinner="Tracking the study across steps...")
@_serialised
def tracking(path: str, stamp_: float):
    """``circuits.tracking.track`` of the study (phases, circuit series, head scores); shared."""
    from circuits.tracking import track

    return track(_open(path, stamp_))


@st.cache_data(max_entries=16, show_spinner=False)
@_serialised
def roles(path: str, stamp_: float) -> list:
    """The heads the library finds taking a detector's role (``Tracking.roles()``: a material rise),
    from the detector scores alone: what the Circuit page needs without tracking the whole study."""
    from circuits.tracking import material_roles

    s = _open(path, stamp_)
    heads = {k.removeprefix("heads/"): np.asarray(s.array(k), dtype=float) for k in head_keys(s)}
    return material_roles(heads, np.asarray(s.steps))


def head_keys(s) -> list[str]:
    """Detector score arrays ([n_steps, L, H]) the study holds, e.g. ``heads/induction``."""
    names = [k for k in s.keys("heads") if k.count("/") == 1]
    first = [k for k in ("heads/induction", "heads/previous_token") if k in names]
    return first + [k for k in names if k not in first]


TRUST_KEY = "circuit/trust"  # circuits.discovery.trust.TRUST_KEY; named here so that a study without it loads no torch


@st.cache_data(max_entries=16, show_spinner=False)
@_serialised
def trust(path: str, stamp_: float) -> tuple[list, dict]:
    """(the checked steps' ``TrustReport``s, what ``trust_text`` needs besides them); ([], {}) unchecked.

    The trust module lives in ``circuits.discovery``, whose package loads torch: imported only for
    a study that holds trust checks."""
    s = _open(path, stamp_)
    if not s.has(TRUST_KEY):
        return [], {}
    from circuits.discovery.trust import trust_from_study, trust_settings

    return trust_from_study(s), trust_settings(s)


def bootstrap_settings(s) -> tuple[int, float]:
    """(resamples, stable share) the study's circuits were bootstrapped with (its recorded options)."""
    from circuits.config import RESAMPLES, STABLE_SHARE

    options = s.provenance.get("options", {}) or {}
    return int(options.get("resamples", RESAMPLES)), float(options.get("stable_share", STABLE_SHARE))


@st.cache_data(max_entries=256, show_spinner=False)
def edge_table(path: str, stamp_: float, step: int, mode: str, threshold: float, top_n: int) -> list[dict]:
    """The edges drawn at ``step`` with their score +- se, inclusion, and which stored circuit holds them."""
    stack = circuit_stack(path, stamp_)
    i = stack.steps.index(step)
    return gv.edge_rows(list(stack.forward_names), list(stack.backward_names), stack.scores[i],
                        selection_at(stack, i, mode, threshold, top_n), stack.stats(i), _circuits_at(stack, i))


def _circuits_at(stack: CircuitStack, i: int) -> dict[str, np.ndarray]:
    circuits = {"full-data circuit": stack.in_circuit[i]}
    if stack.stable is not None:
        circuits = {"stable circuit": stack.circuit[i]} | circuits
    return circuits


@st.cache_data(max_entries=256, show_spinner=False)
def node_edges(path: str, stamp_: float, step: int, mode: str, threshold: float, top_n: int, node: str) -> list[dict]:
    """The edges into and out of ``node`` at ``step``, strongest first: those of the selection,
    or in the key-edges view all of the node's scored edges (most of them are in bundles)."""
    stack = circuit_stack(path, stamp_)
    i = stack.steps.index(step)
    forward, backward = list(stack.forward_names), list(stack.backward_names)
    chosen = selection_at(stack, i, mode, threshold, top_n)
    if mode == "key":
        chosen = chosen | _bundled_rest(stack, i, mode, chosen)
    return gv.edge_rows(forward, backward, stack.scores[i], chosen & gv.touching(forward, backward, node),
                        stack.stats(i), _circuits_at(stack, i))
