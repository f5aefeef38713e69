"""Shared fixtures: small real runs trained once per test session.

``induction_run`` (the built-in induction run, ~15 s), ``tiny_modadd_run`` (modular addition
with p=31, 300 steps) and ``grokking_run`` (the same to 1500 steps) are trained into a folder
shared by all xdist workers of the session, under a file lock, so that ``pytest -n 2`` still
trains each of them once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock

TINY_MODADD = {"p": 31, "train_frac": 0.7, "steps": 300, "checkpoint_every": 100, "freeze_biases": False}
# Memorises by step ~100, test accuracy ~0.9 at 1000 and > 0.95 at 1500 (~1-2 min of training).
GROKKING_MODADD = {"p": 31, "train_frac": 0.7, "steps": 1500, "checkpoint_every": 100, "freeze_biases": False}
# Tests on it carry ``xdist_group("grokking")`` and share one worker (``--dist loadgroup``):
# the other worker goes on with the rest instead of waiting for the run's lock.


def _shared_run(tmp_path_factory, worker_id: str, name: str, recipe: str, **options) -> Path:
    """Train ``recipe`` into a session-wide folder once; later callers get the finished run."""
    from circuits.recipes import train_recipe

    base = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: every worker's basetemp sits in one session folder
        base = base.parent
    out = base / "shared-runs" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "metrics.json").exists():
            train_recipe(recipe, out, progress=False, **options)
    return out


@pytest.fixture(scope="session")
def induction_run(tmp_path_factory, worker_id) -> Path:
    """Folder of the built-in induction run (default options), trained once per session."""
    return _shared_run(tmp_path_factory, worker_id, "induction-2l", "induction")


@pytest.fixture(scope="session")
def grokking_run(tmp_path_factory, worker_id) -> Path:
    """Folder of a modular-addition run that groks (p=31, 70% train, 1500 steps)."""
    return _shared_run(tmp_path_factory, worker_id, "modadd-p31-grok", "modular-addition", **GROKKING_MODADD)


@pytest.fixture(scope="session")
def tiny_modadd_run(tmp_path_factory, worker_id) -> Path:
    """Folder of a small modular-addition run: p=31, 70% train, 300 steps, checkpoint every 100."""
    return _shared_run(tmp_path_factory, worker_id, "modadd-p31", "modular-addition", **TINY_MODADD)


@pytest.fixture
def inject_fault(monkeypatch):
    """``inject_fault("batch@3:enospc")`` sets ``CIRCUITS_FAULT`` for this test (``None`` clears
    it); hit counts restart at each call. Processes the test starts inherit it (circuits.faults)."""
    from circuits import faults

    def set_fault(spec: str | None) -> None:
        faults.reset()
        if spec is None:
            monkeypatch.delenv(faults.ENV, raising=False)
        else:
            monkeypatch.setenv(faults.ENV, spec)

    yield set_fault
    faults.reset()
