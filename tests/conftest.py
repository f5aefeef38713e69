"""Test tiers, and shared fixtures: small real runs trained once per test session.

Tiers (see tests/README.md): a test that uses a trained run (``TRAINED_RUNS``, directly or
through any fixture built on one, ``BUILT_ON_A_RUN``) or is marked ``slow`` is a ``journey``; every other test is
a unit test. Unit tests run first; ``pytest -m "not journey"`` (``make unit``) runs only them.

``induction_run`` (the built-in induction run, under a minute on a free CPU),
``tiny_modadd_run`` (modular addition with p=31, 300 steps) and ``grokking_run`` (the same to
1500 steps) are trained into a folder shared by all xdist workers of the session, under a
file lock, so that ``pytest -n 2`` still trains each of them once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from filelock import FileLock

TRAINED_RUNS = frozenset({"induction_run", "grokking_run", "tiny_modadd_run"})
# Fixtures that reach a trained run through ``request.getfixturevalue``, which the fixture
# closure below cannot see: list them here.
BUILT_ON_A_RUN = frozenset({"app_study"})


def pytest_collection_modifyitems(config, items):
    """Mark journeys (tests on a trained run, or ``slow``) and order the unit tests first.

    ``item.fixturenames`` is the closure of the fixtures a test needs, so a test reaching a
    trained run through another fixture (``app_study``, ``final_ctx``, ...) counts too.
    """
    units, journeys = [], []
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if needs & (TRAINED_RUNS | BUILT_ON_A_RUN) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.journey)
            journeys.append(item)
        else:
            units.append(item)
    items[:] = units + journeys  # stable: each tier keeps its files' order


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
