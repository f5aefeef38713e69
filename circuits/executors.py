"""Where a sweep's steps run: in this process (``LocalExecutor``) or as Ray tasks (``RayExecutor``).

A step is the unit of work and of storage: ``run_step(spec, step)`` loads that checkpoint,
visits it (``circuits.visit.visit_step``) and lands ITS shard atomically. It is a plain
function, so the same code runs in the sweep's own process or as a Ray task on any node of a
cluster (the study folder must then be on a file system every node sees). The driver (the
process that called ``sweep``) only hands out steps and rebuilds ``index.h5`` as shards land;
finished shards are skipped by the sweep, so a resumed or retried sweep redoes nothing, whatever
executor made the shards before.

Ray is imported only by ``RayExecutor`` (``pip install 'circuits[ray]'``). Each Ray task asks
for one CPU (and one GPU when the device is CUDA) and runs torch on one thread; a task that
fails in a way another attempt may not (``RETRIED``; not a bad input) is retried
``max_retries`` times, and steps that still fail are reported together, in one line, once
every other step has landed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from circuits import store
from circuits.config import SweepConfig
from circuits.errors import CircuitsError, RetryableError, first_line
from circuits.faults import fault
from circuits.timing import phase
from circuits.visit import StepSummary, VisitPlan, shard_provenance, visit_step

# What Ray retries: failures that may pass on another attempt or machine (I/O, a lost
# connection, a Hub download; CUDA out of memory is a RuntimeError). Any other CircuitsError
# is a bad input that fails the same way every time. A dying worker is always retried.
RETRIED = (OSError, RuntimeError, MemoryError, TimeoutError, RetryableError)


@dataclass(frozen=True)
class StepSpec:
    """What every step of one sweep shares: sent once to each worker (``ray.put``)."""

    plan: VisitPlan
    out: Path
    record: dict[str, Any]  # the study's record (study.json) without the task's arrays and prompts
    fault: str | None = None  # the driver's CIRCUITS_FAULT (tests only): workers may predate it


@dataclass
class StepResult:
    """What a landed step reports back to the driver (small: no arrays)."""

    step: int
    summary: StepSummary | None = None
    layout: store.Layout = field(default_factory=dict)
    tokens_seen: int = -1
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    host: str = ""
    pid: int = 0


def run_step(spec: StepSpec, step: int, *, model=None, writer: store.BackgroundWriter | None = None,
             landed: Callable[[StepResult], None] | None = None) -> StepResult:
    """Load ``step`` (unless ``model`` is given), visit it and land its shard atomically.

    With no ``writer`` the call owns one and returns once the shard has landed. With a shared
    ``writer`` (the local executor) the landing is queued on it, so writing overlaps the next
    step's loading; ``landed`` then runs on the writer thread, after the rename.
    """
    from circuits.loading import load

    started, cpu_started = time.perf_counter(), time.process_time()
    fault("step", spec.out, step=step, spec=spec.fault)
    result = StepResult(step=int(step), host=socket.gethostname(), pid=os.getpid())
    final = spec.out / store.SHARD_DIR / store.shard_name(step)

    def land() -> None:
        layouts, tokens, problems = store.shard_layouts([(step, final)])
        if step in problems:
            raise CircuitsError(problems[step])
        result.layout, result.tokens_seen = layouts[step], tokens[step]
        result.seconds = time.perf_counter() - started
        result.cpu_seconds = time.process_time() - cpu_started
        if landed is not None:
            landed(result)

    own = writer is None
    if writer is None:
        writer = store.BackgroundWriter(depth=2)
    try:
        plan = spec.plan
        if model is None:
            with phase("load"):
                model = load(plan.manifest, step, plan.device)
        shard = store.ShardWriter(final, plan.task.n_examples, plan.batch_size, writer)
        try:
            result.summary = visit_step(model, plan, step, shard)
            shard.finish(shard_provenance(spec.record, plan, step), then=land)
            if own:
                with phase("write"):
                    writer.wait()
        except BaseException:
            shard.abort()
            raise
    finally:
        if own:
            writer.close()
    return result


# ---------------------------------------------------------------- executors


class LocalExecutor:
    """Steps one after the other in this process; writes overlap the next step's load and visit."""

    name = "local"

    workers = 1

    def run(self, spec: StepSpec, steps: Sequence[int], landed: Callable[[StepResult], None],
            started: Callable[[int], None] = lambda step: None, model=None) -> list[StepResult]:
        """Run ``steps``; ``model`` is the loaded checkpoint of ``steps[0]`` when the caller has it."""
        results: list[StepResult] = []
        with store.BackgroundWriter(depth=2) as writer:
            for i, step in enumerate(steps):
                started(step)
                results.append(run_step(spec, step, model=model if i == 0 else None, writer=writer,
                                        landed=landed))
                model = None
            with phase("write"):
                writer.wait()
        return results

    def close(self) -> None:
        pass


def _ray_step(spec: StepSpec, step: int) -> StepResult:
    """The Ray task: one torch thread per worker, the shard landed before returning."""
    import torch

    torch.set_num_threads(1)
    return run_step(spec, step)


class RayExecutor:
    """Each step is one Ray task (``num_cpus=1``, plus ``num_gpus`` on CUDA) that writes its shard.

    ``address=None`` starts a local Ray instance with ``workers`` CPUs (or joins the one this
    process already has); an address (``auto``, ``ray://host:10001``, ``host:6379``) connects to
    an existing cluster. At most ``workers`` steps are in flight; by default as many as the
    cluster has CPUs (GPUs on CUDA). A Ray instance started here is shut down by ``close``.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, device: str = "cpu",
                 max_retries: int = 2, num_gpus: float | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise CircuitsError("--executor ray needs Ray: pip install 'circuits[ray]' (or pip install ray)") from None
        self.ray = ray
        self.cuda = device.startswith("cuda")
        self.max_retries = max_retries
        self.num_gpus = (1.0 if self.cuda else 0.0) if num_gpus is None else num_gpus
        self.started_here = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                                      "configure_logging": True}
            if address is None:
                kwargs["num_cpus"] = workers or os.cpu_count() or 1
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise CircuitsError(f"cannot start or reach {where} ({first_line(err)}); "
                                    f"see docs/scaling.md") from None
            self.started_here = True
        resources = ray.cluster_resources()
        key = "GPU" if self.cuda and self.num_gpus else "CPU"
        per_task = self.num_gpus if key == "GPU" else 1.0
        available = int(resources.get(key, 0) / per_task)
        if available < 1:
            self.close()
            raise CircuitsError(f"the Ray cluster has no {key} for --device {device} (resources: "
                                f"{ {k: v for k, v in resources.items() if k in ('CPU', 'GPU')} })")
        self.workers = workers or available
        self.results: list[StepResult] = []  # of the last run: per-step seconds, CPU seconds, host
        self._remote = ray.remote(_ray_step).options(num_cpus=1, num_gpus=self.num_gpus, max_retries=max_retries,
                                                     retry_exceptions=list(RETRIED))

    def run(self, spec: StepSpec, steps: Sequence[int], landed: Callable[[StepResult], None],
            started: Callable[[int], None] = lambda step: None, model=None) -> list[StepResult]:
        """Submit ``steps`` (at most ``workers`` in flight); ``landed`` runs here as each returns."""
        ray = self.ray
        del model  # every task loads its own checkpoint
        if self.cuda:
            spec = replace(spec, plan=replace(spec.plan, device="cuda"))  # Ray shows each task its GPU as cuda:0
        spec_ref = ray.put(spec)
        queue = list(steps)
        in_flight: dict[Any, int] = {}
        results: list[StepResult] = []
        failed: dict[int, _Failure] = {}

        def submit() -> None:
            while queue and len(in_flight) < self.workers:
                step = queue.pop(0)
                started(step)
                in_flight[self._remote.remote(spec_ref, step)] = step

        try:
            while queue or in_flight:
                submit()
                done, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
                if not done:
                    done, _ = ray.wait(list(in_flight), num_returns=1)
                arrived = []
                for ref in done:
                    step = in_flight.pop(ref)
                    try:
                        arrived.append(ray.get(ref))
                    except ray.exceptions.RayError as err:
                        failed[step] = _Failure(_cause(err), _retried(err))
                submit()  # keep the workers busy while the driver rebuilds the index
                for result in arrived:
                    landed(result)
                    results.append(result)
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            raise
        self.results = results
        if failed:
            first = min(failed)
            others = f" (also failed: steps {', '.join(map(str, sorted(failed)[1:]))})" if len(failed) > 1 else ""
            failure = failed[first]
            attempts = f"after {self.max_retries + 1} attempts" if failure.retried else "(a bad input: not retried)"
            raise CircuitsError(f"step {first} failed on Ray {attempts}: {failure.cause}"
                                f"{others}; the other shards landed, re-run the sweep to retry only these")
        return results

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_here = False


Executor = LocalExecutor | RayExecutor


def make_executor(config: SweepConfig) -> Executor:
    """The executor a (checked) config names; Ray starts or is joined here."""
    if config.executor == "ray":
        return RayExecutor(config.workers, config.ray_address, config.device)
    return LocalExecutor()


@dataclass(frozen=True)
class _Failure:
    """Why a Ray step failed, and whether Ray retried it (not for a bad input)."""

    cause: str
    retried: bool


def _retried(err: BaseException) -> bool:
    cause = getattr(err, "cause", None)
    return cause is None or isinstance(cause, RETRIED)


def _cause(err: BaseException) -> str:
    """One line naming the original error of a failed Ray task."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, CircuitsError):
        return first_line(cause)
    return f"{type(cause).__name__}: {first_line(cause)}"

