"""Helpers for the tests that compare studies on disk (imported by them; holds no tests)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the zstd codec for h5py
import numpy as np

import circuits
from circuits import store

# Provenance that differs between two sweeps of identical contents.
VOLATILE = {"written", "created", "host"}


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, read whole."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def root_attributes(path: Path) -> dict:
    """A shard's root attributes, its provenance parsed and stripped of what differs run to run."""
    with h5py.File(path, "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs if k != "provenance"}
        provenance = json.loads(f.attrs["provenance"]) if "provenance" in f.attrs else {}
    return attrs | {"provenance": {k: v for k, v in provenance.items() if k not in VOLATILE}}


def spread(run: Path, n: int) -> str:
    """``n`` steps spread over the run's schedule, first and last included (a selection string)."""
    steps = circuits.load_manifest(run).steps
    return ",".join(str(steps[round(i * (len(steps) - 1) / (n - 1))]) for i in range(n))


def assert_same_study(got: Path, want: Path, provenance: bool = True) -> None:
    """Same shard files (no temporaries, no .corrupt), bit for bit, same index and read API;
    with ``provenance``, the same shard attributes and study.json too (times and host aside)."""
    names = sorted(p.name for p in (want / store.SHARD_DIR).iterdir())
    assert sorted(p.name for p in (got / store.SHARD_DIR).iterdir()) == names
    for name in names:
        a, b = datasets(got / store.SHARD_DIR / name), datasets(want / store.SHARD_DIR / name)
        assert a.keys() == b.keys(), name
        for key in b:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{name}:{key}"
            assert a[key].tobytes() == b[key].tobytes(), f"{name}: {key} differs"
        if provenance:
            assert root_attributes(got / store.SHARD_DIR / name) == root_attributes(want / store.SHARD_DIR / name)
    index_got, index_want = datasets(got / store.INDEX_FILE), datasets(want / store.INDEX_FILE)
    assert index_got.keys() == index_want.keys()
    for key in index_want:
        np.testing.assert_array_equal(index_got[key], index_want[key], err_msg=f"index:{key}")
    if provenance:
        g_json, w_json = (json.loads((p / store.STUDY_FILE).read_text()) for p in (got, want))
        assert {k: v for k, v in g_json.items() if k not in VOLATILE} == {
            k: v for k, v in w_json.items() if k not in VOLATILE}
    with circuits.open_study(got) as g, circuits.open_study(want) as w:
        assert g.steps == w.steps
        np.testing.assert_array_equal(g.metric(), w.metric())
        for key in w.keys("circuit"):  # circuits, when the sweep found any
            np.testing.assert_array_equal(g.array(key), w.array(key))


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``circuits ARGS`` in this process through the console entry point ``main`` (exit 2 on a
    user error): the exit code, stdout and stderr."""
    import sys

    from circuits import cli

    monkeypatch.setattr(sys, "argv", ["circuits", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
