"""Where a step's time goes: named phases, timed only while a recorder is active.

The sweep and discovery mark their phases (``with phase("score"): ...``); outside
:func:`recording` a phase costs one context-variable read. Inside it, each phase's time is
*exclusive*: a nested phase pauses the one around it, so the phases of a step add up to the
time recorded and each is a share of it (``circuits bench pythia`` reports them so).

Phases used: ``load`` (boot the checkpoint), ``forward`` (the visit's clean and corrupted
forwards), ``extract`` (patterns and activations to numpy), ``score`` (edge scores),
``select`` (choosing the circuit, the faithful search's bookkeeping), ``faithfulness``
(ablated forwards: the search's evaluations, the stable circuit, node effects, the trust
check), ``write`` (the shard).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

PHASES = ("load", "forward", "extract", "score", "select", "faithfulness", "write")


@dataclass
class PhaseClock:
    """Exclusive seconds per phase; ``stack`` holds the open phases, innermost last."""

    seconds: dict[str, float] = field(default_factory=dict)
    stack: list[tuple[str, float]] = field(default_factory=list)

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self.stack:
            self._charge(now)
        self.stack.append((name, now))

    def leave(self) -> None:
        now = time.perf_counter()
        self._charge(now)
        self.stack.pop()
        if self.stack:  # the enclosing phase resumes from now
            outer, _ = self.stack[-1]
            self.stack[-1] = (outer, now)

    def _charge(self, now: float) -> None:
        name, since = self.stack[-1]
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since


_clock: ContextVar[PhaseClock | None] = ContextVar("circuits_phase_clock", default=None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` when a recorder is active (else do nothing)."""
    clock = _clock.get()
    if clock is None:
        yield
        return
    clock.enter(name)
    try:
        yield
    finally:
        clock.leave()


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Record the phases of the block: the dict it yields fills in as phases end."""
    clock = PhaseClock()
    token = _clock.set(clock)
    try:
        yield clock.seconds
    finally:
        _clock.reset(token)
