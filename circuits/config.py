"""Every setting of a sweep in one dataclass, checked once, before anything is loaded or written.

``SweepConfig`` is what ``circuits sweep`` (the CLI), ``circuits.sweep.sweep`` (the API) and the
executors share. Its checks are cheap (no torch, no Ray): a wrong value is refused with one
line naming the option before a checkpoint is loaded or the study folder is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from circuits.errors import CircuitsError

DEFAULT_HOOKS = "blocks.*.hook_resid_post,blocks.*.attn.hook_z"
DTYPES = ("float16", "float32")
# Edge scoring methods of circuits.discovery, and "none" (no circuit at each step).
SCORING_METHODS = ("eap", "eap-ig", "patching")
METHODS = ("none", *SCORING_METHODS)
EXECUTORS = ("local", "ray")
# Analyses that are off unless named (``--analyses llc``): costly, or needing an optional extra.
EXTRA_ANALYSES = ("llc",)
# The bootstrap of each step's circuit (circuits.discovery.uncertainty): resamples of the
# examples, and the share of them an edge must be in to belong to the stable circuit.
RESAMPLES = 20
STABLE_SHARE = 0.8
# How far to trust the method (circuits.discovery.trust): exact patching at this many of the
# selected steps (the last included), where the graph has at most this many edges.
TRUST_STEPS = 5
TRUST_MAX_EDGES = 2000
# Each node's contribution (circuits.discovery.discover): "exact" ablates each writer in turn
# (n_forward ablated copies of the batch), "attribution" sums the node's edge scores (no forward),
# "auto" is exact up to NODE_EXACT_MAX writers (the attention-only induction run has 9; Pythia-70m 55,
# Pythia-160m 157, where 157 ablated forwards would cost more than the whole EAP-IG search).
NODE_EFFECTS = ("auto", "exact", "attribution")
NODE_EXACT_MAX = 64
# The working set of discovery (circuits.discovery.budget): at most this, and at most half the
# memory available when a step starts (on CUDA: the device's free memory).
MAX_MEMORY_DEFAULT = 2 * 2**30
# --follow (circuits.follow): stop after this many seconds without a new checkpoint (unless the
# run says it is done first), looking for new ones every POLL seconds.
FOLLOW_IDLE = 1800.0
FOLLOW_POLL = 5.0
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def _whole(value: Any, at_least: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least ``at_least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_ig_steps(ig_steps: Any) -> None:
    if not _whole(ig_steps, at_least=1):
        raise CircuitsError(f"--ig-steps {ig_steps!r}: eap-ig needs ig_steps >= 1, an integer "
                            "(Hanna et al. use 5, Tigges et al. 30)")


def check_target(target: Any, upper: float = 1.0) -> None:
    """A faithfulness target above 0; at most ``upper`` (a sweep's default: at most the full model)."""
    if not _number(target) or not 0.0 < target <= upper:
        bounds = "above 0" if upper == float("inf") else f"in (0, {upper:g}]"
        raise CircuitsError(f"--target {target!r}: expected a faithfulness {bounds}, e.g. 0.8")


def check_resamples(resamples: Any) -> None:
    if not _whole(resamples, at_least=1):
        raise CircuitsError(f"--resamples {resamples!r}: expected a whole number of resamples >= 1 (default {RESAMPLES})")


def check_stable_share(share: Any) -> None:
    if not _number(share) or not 0.0 < share <= 1.0:
        raise CircuitsError(f"--stable-share {share!r}: expected a share of resamples in (0, 1] (default {STABLE_SHARE})")


def check_trust(trust_steps: Any, trust_max_edges: Any) -> None:
    """Both whole numbers >= 0 (0 turns the trust check off)."""
    for option, value, default in (("--trust-steps", trust_steps, TRUST_STEPS),
                                   ("--trust-max-edges", trust_max_edges, TRUST_MAX_EDGES)):
        if not _whole(value, at_least=0):
            raise CircuitsError(f"{option} {value!r}: expected a whole number >= 0 (default {default}; 0 turns the "
                                "check against exact patching off)")


def check_node_effects(mode: Any) -> None:
    if mode not in NODE_EFFECTS:
        raise CircuitsError(f"--node-effects {mode!r}: expected one of {', '.join(NODE_EFFECTS)}")


def parse_memory(value: Any) -> int:
    """``--max-memory``: bytes from ``2GB``, ``1.5GiB``, ``512M``, ``800MB`` or a whole number of bytes."""
    import re

    if _whole(value, at_least=1):
        return int(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 2**20:
        raise CircuitsError(f"--max-memory {value!r}: expected a size of at least 1 MiB such as 2GB, 1.5GiB or 800MB")
    return int(float(match.group(1)) * _UNITS[unit])


def check_method(method: Any, choices: Sequence[str] = METHODS) -> None:
    if method not in choices:
        raise CircuitsError(f"--method {method!r}: expected one of {', '.join(choices)}")


def check_device(device: Any) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA only where a device is there (torch loads only then)."""
    if not isinstance(device, str) or not (device in ("cpu", "cuda") or device.startswith("cuda:")):
        raise CircuitsError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CircuitsError(f"--device {device}: no CUDA device is available on this machine")


@dataclass(frozen=True)
class SweepConfig:
    """How a sweep runs. ``options`` are extra settings handed to analyses (``ctx.options``).

    ``executor`` is ``local`` (this process, one step at a time) or ``ray`` (one Ray task per
    step, ``workers`` at a time, on a local instance or the cluster at ``ray_address``).

    ``follow``: after the steps present, keep visiting new checkpoints as they land, until the
    run writes its completion marker or ``idle`` seconds pass without one (``circuits.follow``).
    """

    steps: str | None = None
    hooks: str | tuple[str, ...] | None = None
    dtype: str = "float16"
    batch_size: int = 32
    device: str = "cpu"
    n_examples: int | None = None
    seed: int = 0
    method: str = "none"
    ig_steps: int = 5
    target: float = 0.8
    resamples: int = RESAMPLES
    stable_share: float = STABLE_SHARE
    trust_steps: int = TRUST_STEPS
    trust_max_edges: int = TRUST_MAX_EDGES
    node_effects: str = "auto"
    max_memory: str | int | None = None
    keep_logits: bool = False
    extra_analyses: str | tuple[str, ...] = ()  # of EXTRA_ANALYSES (or "a,b"): off by default
    options: Mapping[str, Any] = field(default_factory=dict)
    progress: bool = True
    executor: str = "local"
    workers: int | None = None
    ray_address: str | None = None
    follow: bool = False
    idle: float = FOLLOW_IDLE
    poll: float = FOLLOW_POLL

    def __post_init__(self) -> None:
        if isinstance(self.hooks, list):  # a frozen dataclass stays hashable: lists become tuples
            object.__setattr__(self, "hooks", tuple(self.hooks))
        if isinstance(self.extra_analyses, str):  # "llc" or "llc,other"
            object.__setattr__(self, "extra_analyses", tuple(a.strip() for a in self.extra_analyses.split(",")
                                                             if a.strip()))
        object.__setattr__(self, "extra_analyses", tuple(self.extra_analyses or ()))
        object.__setattr__(self, "options", dict(self.options or {}))
        self.check()

    def check(self) -> None:
        """Refuse a wrong value with one line naming the option (cheap: no model, no Ray)."""
        if self.dtype not in DTYPES:
            raise CircuitsError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if not isinstance(self.keep_logits, bool):
            raise CircuitsError(f"--keep-logits {self.keep_logits!r}: expected True or False")
        if not _whole(self.batch_size, at_least=1):
            raise CircuitsError(f"--batch-size {self.batch_size!r}: must be an integer of at least 1")
        if self.n_examples is not None and not _whole(self.n_examples, at_least=1):
            raise CircuitsError(f"--n-examples {self.n_examples!r}: must be an integer of at least 1")
        check_method(self.method)
        check_ig_steps(self.ig_steps)
        check_target(self.target)
        check_resamples(self.resamples)
        check_stable_share(self.stable_share)
        check_trust(self.trust_steps, self.trust_max_edges)
        check_node_effects(self.node_effects)
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        check_device(self.device)
        for name in self.extra_analyses:
            if name not in EXTRA_ANALYSES:
                raise CircuitsError(f"--analyses {name!r}: expected one of {', '.join(EXTRA_ANALYSES)} "
                                    "(heads and progress always run; the circuit runs with --method)")
        self._check_executor()
        self._check_follow()

    def _check_follow(self) -> None:
        if not isinstance(self.follow, bool):
            raise CircuitsError(f"--follow {self.follow!r}: expected True or False")
        for option, value, default in (("--idle", self.idle, FOLLOW_IDLE), ("--poll", self.poll, FOLLOW_POLL)):
            if not _number(value) or not value > 0:
                raise CircuitsError(f"{option} {value!r}: expected a number of seconds above 0 (default {default:g})")
        if self.follow and self.steps not in (None, "all"):
            raise CircuitsError(f"--steps {self.steps!r} with --follow: a follower visits every checkpoint as it "
                                "lands; leave out --steps (or sweep the steps you want once the run is done)")

    def _check_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise CircuitsError(f"--executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if self.workers is not None and not _whole(self.workers, at_least=1):
            raise CircuitsError(f"--workers {self.workers}: must be at least 1")
        if self.executor == "local":
            if self.workers not in (None, 1):
                raise CircuitsError(f"--workers {self.workers}: the local executor runs one step at a time; use "
                                    f"--executor ray for {self.workers} workers (a local Ray instance starts by itself)")
            if self.ray_address is not None:
                raise CircuitsError("--ray-address needs --executor ray")

    def analysis_options(self) -> dict[str, Any]:
        """What every analysis reads from ``ctx.options`` (and what the study records)."""
        return {"method": self.method, "ig_steps": self.ig_steps, "target": self.target,
                "resamples": self.resamples, "stable_share": self.stable_share, "seed": self.seed,
                "trust_steps": self.trust_steps, "trust_max_edges": self.trust_max_edges,
                "node_effects": self.node_effects, "max_memory": self.max_memory, **self.options}

    def with_settings(self, **settings: Any) -> SweepConfig:
        """This config with some settings replaced; an unknown name is refused by name."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise CircuitsError(f"sweep: unknown setting {unknown[0]!r}; settings are {', '.join(sorted(known))}")
        return replace(self, **settings) if settings else self
