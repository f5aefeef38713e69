"""Step schedules and the step selection language used by sweeps.

Selection grammar (comma-free forms, one per string):

- ``all``                      every step of the run
- ``every:K``                  every K-th step of the run's schedule (first and last kept)
- ``log:N``                    N steps spread log-uniformly over the schedule (by step value)
- ``range:A-B`` / ``range:A-B:K``  steps in [A, B] (every K-th of those when K given)
- ``first:N`` / ``last:N``     the first or last N steps
- ``1000,2000,4000``           an explicit list; every value must be in the schedule
"""

from __future__ import annotations

import math

from circuits.errors import CircuitsError

PYTHIA_STEPS: list[int] = [0] + [2**i for i in range(10)] + list(range(1000, 143001, 1000))


def log_then_linear(total: int, linear_every: int, log_until: int | None = None) -> list[int]:
    """0, 1, 2, 4, ... up to ``log_until`` then every ``linear_every`` steps to ``total``.

    Dense early checkpoints resolve the fast early dynamics; the linear tail resolves
    phase changes that happen later (Pythia uses the same shape).
    """
    if total < 1 or linear_every < 1:
        raise CircuitsError(f"schedule: total ({total}) and linear_every ({linear_every}) must be >= 1")
    log_until = linear_every if log_until is None else log_until
    steps = {0}
    power = 1
    while power <= min(log_until, total):
        steps.add(power)
        power *= 2
    steps.update(range(linear_every, total + 1, linear_every))
    steps.add(total)
    return sorted(steps)


def select_steps(spec: str | None, schedule: list[int]) -> list[int]:
    """Resolve a selection string against a run's schedule (sorted, unique)."""
    if not schedule:
        raise CircuitsError("step selection: the run has no steps")
    schedule = sorted(set(schedule))
    spec = (spec or "all").strip()
    kind, _, arg = spec.partition(":")
    try:
        if spec == "all":
            return schedule
        if kind == "every":
            k = _positive_int(arg, spec)
            chosen = schedule[::k]
            return sorted(set(chosen) | {schedule[-1]})
        if kind == "log":
            return _log_spaced(schedule, _positive_int(arg, spec))
        if kind in ("first", "last"):
            n = _positive_int(arg, spec)
            return schedule[:n] if kind == "first" else schedule[-n:]
        if kind == "range":
            return _range(arg, schedule, spec)
        return _explicit(spec, schedule)
    except CircuitsError:
        raise
    except ValueError as err:
        raise CircuitsError(f"step selection {spec!r}: {err}") from None


def spread_steps(selected: list[int], n: int) -> list[int]:
    """``n`` of the ``selected`` steps spread evenly over them by position, first and last
    included (``n`` = 1: the last); all of them when there are at most ``n``; none when ``n`` <= 0.

    The sweep uses it to choose where the circuit's scores are checked against exact patching.
    """
    steps = sorted(set(int(s) for s in selected))
    if n <= 0 or not steps:
        return []
    if n >= len(steps):
        return steps
    if n == 1:
        return [steps[-1]]
    last = len(steps) - 1  # position i * last / (n - 1), rounded half up, in integers
    return sorted({steps[(2 * i * last + (n - 1)) // (2 * (n - 1))] for i in range(n)})


def _positive_int(text: str, spec: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise CircuitsError(f"step selection {spec!r}: expected a positive integer after ':', got {text!r}")
    return int(text)


def _log_spaced(schedule: list[int], n: int) -> list[int]:
    if n >= len(schedule):
        return schedule
    lo, hi = math.log1p(schedule[0]), math.log1p(schedule[-1])
    chosen = set()
    for i in range(n):
        target = math.expm1(lo + (hi - lo) * i / max(n - 1, 1))
        chosen.add(min(schedule, key=lambda s: (abs(s - target), s)))
    return sorted(chosen)


def _range(arg: str, schedule: list[int], spec: str) -> list[int]:
    parts = arg.split(":")
    bounds = parts[0].split("-")
    if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds) or len(parts) > 2:
        raise CircuitsError(f"step selection {spec!r}: expected range:A-B or range:A-B:K with integers")
    lo, hi = int(bounds[0]), int(bounds[1])
    if lo > hi:
        raise CircuitsError(f"step selection {spec!r}: range start {lo} is after its end {hi}")
    chosen = [s for s in schedule if lo <= s <= hi]
    if len(parts) == 2:
        chosen = chosen[:: _positive_int(parts[1], spec)]
    if not chosen:
        raise CircuitsError(f"step selection {spec!r}: no step of the run lies in [{lo}, {hi}]")
    return chosen


def _explicit(spec: str, schedule: list[int]) -> list[int]:
    values = []
    for token in spec.split(","):
        token = token.strip()
        if not token.lstrip("-").isdigit():
            raise CircuitsError(
                f"step selection {spec!r}: {token!r} is not a step; use all, every:K, log:N, "
                "range:A-B[:K], first:N, last:N or a comma-separated list of steps"
            )
        values.append(int(token))
    known = set(schedule)
    missing = [v for v in values if v not in known]
    if missing:
        raise CircuitsError(
            f"step selection {spec!r}: step {missing[0]} is not in the run "
            f"(it has {len(schedule)} steps from {schedule[0]} to {schedule[-1]})"
        )
    return sorted(set(values))
