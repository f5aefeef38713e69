"""Fault injection for tests: one environment variable, parsed here and nowhere else.

``CIRCUITS_FAULT="POINT[@N]:ACTION"`` (comma-separated for several) acts the N-th time (the
1st by default) this process reaches POINT. Inert unless the variable is set. Child processes
inherit it, so a test can aim at a sweep it starts (``tests/test_reliability_kill.py``);
in-process tests set it with the ``inject_fault`` fixture (``tests/conftest.py``), which also
restarts the counts. Documented for users in ``docs/reliability.md``.

Points, each one ``fault(point, path)`` call:
- ``batch``: a batch half written into a temporary shard (``store.writer``);
- ``finish``: shard flushed, its completion mark not yet set (``store.writer``);
- ``landed``: shard renamed into place, the index not yet rebuilt (``store.writer``);
- ``index``: temporary index half written (``store.index``);
- ``step``: a step about to be loaded and visited (``executors.run_step``). Here N names the
  step, not a hit count, because Ray may retry a step in another process.

Actions:
- ``pause``: print ``circuits-fault: POINT@N`` to stderr and sleep (the test kills the process there);
- ``enospc``: raise ``OSError(ENOSPC)`` naming the file at hand (a full disk);
- ``fail:TIMES:FOLDER`` / ``fail-input:TIMES:FOLDER`` (``step`` only): fail the first TIMES
  attempts at the step with a RuntimeError (retried by Ray) or a CircuitsError (a bad input,
  not retried); attempts are counted as files in FOLDER, so they add up across processes.

Ray workers may have started before a test set the variable, so the sweep reads it once
(``current()``) and hands the value to each step with the work (``fault(..., spec=...)``).

A misspelt point or action raises ValueError rather than never firing: a fault that silently
does nothing would let its test pass without testing anything.

Extending. A point is a name in ``POINTS`` plus a ``fault(...)`` call where it should act; an
action is one function in ``_ACTIONS``. A rule keeps whatever follows a second colon as its
``argument`` (``POINT[@N]:ACTION:ARG``; ARG may hold colons, as paths do) for its action.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from circuits.errors import CircuitsError

ENV = "CIRCUITS_FAULT"
POINTS = ("batch", "finish", "landed", "index", "step")
PAUSE_SECONDS = 600  # long enough for any test to kill the paused process
MARK = "circuits-fault: "  # what a paused process prints to stderr, then POINT@N

_hits: dict[str, int] = {}  # point -> times this process reached it while ENV was set


@dataclass(frozen=True)
class Rule:
    """One ``POINT[@N]:ACTION[:ARG]`` item of ``CIRCUITS_FAULT``."""

    point: str
    nth: int
    action: str
    argument: str = ""


def _pause(rule: Rule, hit: int, path: str | Path) -> None:
    print(f"{MARK}{rule.point}@{hit}", file=sys.stderr, flush=True)
    time.sleep(PAUSE_SECONDS)


def _enospc(rule: Rule, hit: int, path: str | Path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fail(rule: Rule, step: int, path: str | Path, error: type[Exception] = RuntimeError) -> None:
    times, _, folder = rule.argument.partition(":")
    counter = Path(folder)
    counter.mkdir(parents=True, exist_ok=True)
    attempt = len(list(counter.glob(f"step{step}-attempt*"))) + 1
    (counter / f"step{step}-attempt{attempt}").touch()
    if attempt <= int(times):
        raise error(f"injected failure at step {step} (attempt {attempt} of {times} to fail)")


def _fail_input(rule: Rule, step: int, path: str | Path) -> None:
    _fail(rule, step, path, CircuitsError)


_ACTIONS: dict[str, Callable[[Rule, int, str | Path], None]] = {
    "pause": _pause, "enospc": _enospc, "fail": _fail, "fail-input": _fail_input,
}


@functools.lru_cache(maxsize=8)
def parse(spec: str) -> tuple[Rule, ...]:
    """The rules of a ``CIRCUITS_FAULT`` value (cached: the writer asks at every batch)."""
    rules = []
    for item in spec.split(","):
        where, _, rest = item.strip().partition(":")
        action, _, argument = rest.partition(":")
        point, _, nth = where.partition("@")
        if point not in POINTS or action not in _ACTIONS:
            raise ValueError(f"{ENV}={spec!r}: {item.strip()!r} is not POINT[@N]:ACTION with POINT one of "
                             f"{', '.join(POINTS)} and ACTION one of {', '.join(_ACTIONS)}")
        try:
            count = int(nth or 1)
        except ValueError:
            raise ValueError(f"{ENV}={spec!r}: {where!r} counts hits with a whole number (POINT@N)") from None
        rules.append(Rule(point, count, action, argument))
    return tuple(rules)


def _count(point: str) -> int:
    """This hit's number at ``point``, counted in this process."""
    _hits[point] = hit = _hits.get(point, 0) + 1
    return hit


def current() -> str | None:
    """The value of ``CIRCUITS_FAULT`` in this process (None when unset or empty)."""
    return os.environ.get(ENV) or None


def fault(point: str, path: str | Path, *, step: int | None = None, spec: str | None = None) -> None:
    """Act on ``point`` if ``CIRCUITS_FAULT`` (or ``spec``, the driver's value) says so.

    ``path`` is the file being written there; ``step`` (point ``step``) is matched instead of
    a hit count.
    """
    spec = spec or current()
    if not spec:
        return
    rules = parse(spec)
    hit = _count(point) if step is None else int(step)
    for rule in rules:
        if rule.point == point and rule.nth == hit:
            _ACTIONS[rule.action](rule, hit, path)


def reset() -> None:
    """Restart the hit counts (a test setting a new fault counts from its own start)."""
    _hits.clear()
