"""Landed shards: finding them, refusing damaged ones, and stacking them into ``index.h5``.

A file named ``stepNNNNNNNN.h5`` is complete by construction (``store.writer``), but it may be
damaged, copied in by hand or come from another study: ``open_shard`` checks before anything
reads it. ``index.h5`` is a convenience for h5py users (one virtual dataset per shard dataset,
steps stacked); the ``Study`` reader goes to the shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from circuits.errors import CircuitsError
from circuits.faults import fault
from circuits.store.format import (
    INDEX_FILE,
    INDEX_FORMAT,
    PATTERNS,
    SHARD_DIR,
    SHARD_FORMAT,
    SHARD_RE,
    TMP_RE,
    cause,
    describe_patterns,
    fill_value,
    format_error,
    json_text,
    shard_name,
)

# A shard's datasets: path -> (shape, dtype).
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


# ---------------------------------------------------------------- shard inspection


def datasets_of(f: h5py.File) -> Layout:
    """Every dataset of a shard: path -> (shape, dtype)."""
    found: Layout = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = (tuple(obj.shape), obj.dtype)

    try:
        f.visititems(visit)
    except (RuntimeError, OSError, ValueError, KeyError) as err:  # damaged metadata
        raise CircuitsError(f"{f.filename}: corrupted shard, cannot list its datasets ({cause(err)})") from None
    return found


def _attr(f: h5py.File, name: str) -> Any:
    """A root attribute as a plain Python scalar (None when missing or not a scalar)."""
    try:
        value = f.attrs.get(name)
    except (OSError, TypeError, ValueError, RuntimeError, KeyError):  # an attribute h5py cannot decode
        return None
    if isinstance(value, np.ndarray):
        if value.shape != ():
            return None
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def check_shard(f: h5py.File, path: Path, step: int | None = None, prompt_hash: str | None = None) -> None:
    """Refuse a shard without its completion mark, of another format, with damaged attributes,
    or (given the study's ``prompt_hash``) of another study.

    Attributes are read as plain values (nothing is unpickled); ``step`` is the one its file name says.
    """
    if _attr(f, "complete") is not True:
        raise CircuitsError(f"{path}: incomplete shard (no completion mark); re-run the sweep to redo it")
    if _attr(f, "format") != SHARD_FORMAT:
        raise CircuitsError(format_error(path, "shard", _attr(f, "format"), SHARD_FORMAT))
    for name in ("step", "tokens_seen"):
        value = _attr(f, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CircuitsError(f"{path}: damaged shard, attribute {name!r} is {value!r}, expected an integer")
    if step is not None and _attr(f, "step") != step:
        raise CircuitsError(f"{path}: holds step {_attr(f, 'step')}, not the step {step} its name says "
                            "(a shard renamed or copied by hand); move it away and re-run the sweep")
    try:
        provenance = json.loads(_attr(f, "provenance"))
    except (TypeError, ValueError):
        provenance = None
    if not isinstance(provenance, dict):
        raise CircuitsError(f"{path}: damaged shard, attribute 'provenance' is not a JSON object")
    for name in ("step", "tokens_seen"):  # written twice: attribute and provenance must agree
        if provenance.get(name) != _attr(f, name):
            raise CircuitsError(f"{path}: damaged shard, {name} {_attr(f, name)} disagrees with its provenance "
                                f"({provenance.get(name)!r})")
    theirs = provenance.get("task")
    theirs = theirs.get("prompt_hash") if isinstance(theirs, dict) else None
    if prompt_hash is not None and theirs is not None and theirs != prompt_hash:
        raise CircuitsError(f"{path}: a shard of another study (prompt hash {theirs!r}, this study's "
                            f"{prompt_hash!r}); move it away and re-run the sweep")


def open_shard(path: Path, prompt_hash: str | None = None) -> h5py.File:
    """Open a landed shard read-only, refusing damaged or unmarked files (and, given the study's
    ``prompt_hash``, a shard of another study) with one clear line."""
    try:
        f = h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as err:
        raise CircuitsError(f"{path}: corrupted or truncated shard, cannot be opened ({cause(err)})") from None
    m = SHARD_RE.match(Path(path).name)
    try:
        check_shard(f, path, int(m.group(1)) if m else None, prompt_hash)
    except CircuitsError:
        f.close()
        raise
    return f


def scan_shards(study: Path) -> dict[int, Path]:
    """Step -> path of every file named like a landed shard (temporary files are ignored)."""
    folder = Path(study) / SHARD_DIR
    if not folder.is_dir():
        return {}
    found = {}
    for entry in os.scandir(folder):
        m = SHARD_RE.match(entry.name)
        if m and entry.is_file():
            found[int(m.group(1))] = Path(entry.path)
    return dict(sorted(found.items()))


def shard_layouts(paths: Iterable[tuple[int, Path]]) -> tuple[dict[int, Layout], dict[int, int], dict[int, str]]:
    """(layouts, tokens_seen, problems) of landed shards, for building the index."""
    layouts, tokens, problems = {}, {}, {}
    for step, path in paths:
        try:
            with open_shard(path) as f:
                layouts[step] = datasets_of(f)
                tokens[step] = int(f.attrs.get("tokens_seen", -1))
        except CircuitsError as err:
            problems[step] = str(err)
    return layouts, tokens, problems


def clean_stale_temporaries(study: Path) -> list[Path]:
    """Remove temporary files left by killed writers (their process is gone)."""
    removed = []
    for folder in (Path(study), Path(study) / SHARD_DIR):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            m = TMP_RE.match(entry.name)
            if m and not _pid_alive(int(m.group(2))):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def steps_being_written(study: Path) -> frozenset[int]:
    """Steps whose shard a live process (not this one) is writing now: its temporary file is there."""
    found = set()
    try:
        with os.scandir(Path(study) / SHARD_DIR) as entries:
            for entry in entries:
                m = TMP_RE.match(entry.name)
                if m and m.group(1).startswith("step") and _pid_alive(int(m.group(2))):
                    found.add(int(m.group(1)[4:12]))
    except OSError:
        pass
    return frozenset(found)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier, aborted sweep in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the index


def write_index(study: Path, layouts: dict[int, Layout], steps_meta: dict[int, int],
                provenance: dict[str, Any]) -> Path:
    """(Re)write ``index.h5`` atomically: one virtual dataset per shard dataset, steps stacked.

    ``layouts`` maps step -> that shard's datasets (path -> shape, dtype). A step whose shard
    lacks a dataset, or holds it with another shape, reads as the fill value there (NaN for
    floats, False for booleans, -1 for integers).
    """
    study = Path(study)
    steps = sorted(layouts)
    final = study / INDEX_FILE
    tmp = study / f".{INDEX_FILE}.tmp-{os.getpid()}"
    keys: Layout = {}
    for step in steps:
        for name, spec in layouts[step].items():
            keys.setdefault(name, spec)
    try:
        _write_index_file(tmp, steps, keys, layouts, steps_meta, provenance)
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = (err.strerror or cause(err)).lower()
        raise CircuitsError(f"{final}: cannot write the index ({reason}); the shards are intact, "
                            "re-run the sweep to rebuild it") from None
    return final


def _write_index_file(tmp: Path, steps: list[int], keys: Layout, layouts: dict[int, Layout],
                      steps_meta: dict[int, int], provenance: dict[str, Any]) -> None:
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = INDEX_FORMAT
        f.attrs["provenance"] = json_text(provenance)
        f.create_dataset("steps", data=np.asarray(steps, dtype=np.int64))
        f.create_dataset("tokens_seen", data=np.asarray([steps_meta.get(s, -1) for s in steps], dtype=np.int64))
        for name, (shape, dtype) in sorted(keys.items()):
            layout = h5py.VirtualLayout(shape=(len(steps), *shape), dtype=dtype)
            for i, step in enumerate(steps):
                if layouts[step].get(name, (None,))[0] == shape:
                    source = f"{SHARD_DIR}/{shard_name(step)}"  # relative: resolved next to index.h5
                    layout[i] = h5py.VirtualSource(source, name, shape=shape, dtype=dtype)
            dataset = f.create_virtual_dataset(name, layout, fillvalue=fill_value(np.dtype(dtype)))
            if name == PATTERNS:
                describe_patterns(dataset)
        fault("index", tmp)
        f.flush()
