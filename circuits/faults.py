"""Fault injection for tests: one environment variable, parsed here and nowhere else.

``CIRCUITS_FAULT="POINT[@N]:ACTION"`` (comma-separated for several) acts the N-th time (the
1st by default) this process reaches POINT. Inert unless the variable is set. Child processes
inherit it, so a test can aim at a sweep it starts (``tests/test_reliability_kill.py``);
in-process tests set it with the ``inject_fault`` fixture (``tests/conftest.py``), which also
restarts the counts. Documented for users in ``docs/reliability.md``.

Points, each one ``fault(point, path)`` call in ``circuits.store``:
- ``batch``: a batch half written into a temporary shard (``store.writer``);
- ``finish``: shard flushed, its completion mark not yet set (``store.writer``);
- ``landed``: shard renamed into place, the index not yet rebuilt (``store.writer``);
- ``index``: temporary index half written (``store.index``).

Actions:
- ``pause``: print ``circuits-fault: POINT@N`` to stderr and sleep (the test kills the process there);
- ``enospc``: raise ``OSError(ENOSPC)`` naming the file at hand (a full disk).

A misspelt point or action raises ValueError rather than never firing: a fault that silently
does nothing would let its test pass without testing anything.

Extending. A point is a name in ``POINTS`` plus a ``fault(...)`` call where it should act; an
action is one function in ``_ACTIONS``. A rule keeps whatever follows a second colon as its
``argument`` (``POINT[@N]:ACTION:ARG``; ARG may hold colons, as paths do) for its action. The
writer's points count hits in this process (``_hits``). A point whose hits must add up across
processes, as the executors' step faults do today through ``CIRCUITS_TEST_FAULT`` (Ray reruns
a failed step in another process), fits the same shape: a ``step`` point called in
``executors.run_step``, actions ``fail`` / ``fail-input`` raising RuntimeError / CircuitsError,
and a folder as ARG (``step@N:fail:FOLDER``) in which ``_count`` counts hits as files, one per
hit, instead of in ``_hits``.
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

ENV = "CIRCUITS_FAULT"
POINTS = ("batch", "finish", "landed", "index")
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


_ACTIONS: dict[str, Callable[[Rule, int, str | Path], None]] = {"pause": _pause, "enospc": _enospc}


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


def fault(point: str, path: str | Path) -> None:
    """Act on ``point`` if ``CIRCUITS_FAULT`` says so; ``path`` is the file being written there."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    rules = parse(spec)
    hit = _count(point)
    for rule in rules:
        if rule.point == point and rule.nth == hit:
            _ACTIONS[rule.action](rule, hit, path)


def reset() -> None:
    """Restart the hit counts (a test setting a new fault counts from its own start)."""
    _hits.clear()
