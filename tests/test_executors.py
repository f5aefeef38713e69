"""Executors: a sweep on Ray gives the same study, bit for bit, as in this process; resume across
executors; failed Ray tasks are retried, and reported when they keep failing.

One local Ray instance (2 CPUs, no dashboard) serves the tests that need Ray; it starts in ~5-10 s.
Ray is an optional extra: without it only those tests (the ones using ``ray_instance``) are
skipped. The GPU path of ``RayExecutor`` is checked on a fake ``ray`` module (no GPU needed).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

import hdf5plugin  # noqa: F401 - registers the codecs the shards use
import pytest
from study_helpers import assert_same_study

from circuits import store
from circuits.config import SweepConfig
from circuits.errors import CircuitsError
from circuits.executors import LocalExecutor, RayExecutor, make_executor
from circuits.sweep import sweep

KW = {"n_examples": 4, "batch_size": 2, "method": "none", "progress": False}
# Differ between runs by design: when and where a shard was written.
@pytest.fixture(scope="module")
def ray_instance():
    """The ``ray`` module, with a local instance shared by the module; sweeps find it and leave it running.

    Skips the tests that use it when Ray is not installed (the others run without Ray)."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'circuits[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def steps(induction_run) -> list[int]:
    """Four steps across the run's schedule: first, two inside, last."""
    from circuits.manifest import load_manifest

    schedule = load_manifest(induction_run).steps
    return [schedule[0], schedule[len(schedule) // 3], schedule[2 * len(schedule) // 3], schedule[-1]]


def spec(steps: list[int]) -> str:
    return ",".join(map(str, steps))


@pytest.fixture(scope="module")
def local_study(induction_run, steps, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("executors") / "local"
    sweep(induction_run, "induction", out, steps=spec(steps), **KW)
    return out


def test_ray_sweep_equals_local_sweep_bit_for_bit(induction_run, steps, local_study, ray_instance, tmp_path):
    study = sweep(induction_run, "induction", tmp_path / "ray", steps=spec(steps), executor="ray", workers=2, **KW)
    assert study.steps == steps
    assert_same_study(local_study, tmp_path / "ray")
    assert ray_instance.is_initialized()  # a Ray instance the sweep did not start is left running


def test_resume_across_executors_skips_finished_shards(induction_run, steps, local_study, ray_instance, tmp_path):
    out = tmp_path / "mixed"
    sweep(induction_run, "induction", out, steps=spec(steps[:2]), **KW)
    before = {s: p.stat().st_mtime_ns for s, p in store.scan_shards(out).items()}
    sweep(induction_run, "induction", out, steps=spec(steps), executor="ray", workers=2, **KW)
    after = {s: p.stat().st_mtime_ns for s, p in store.scan_shards(out).items()}
    assert {s: after[s] for s in before} == before  # the local shards were not redone
    assert sorted(after) == steps
    sweep(induction_run, "induction", out, steps=spec(steps), **KW)  # nothing left: local does nothing
    assert {s: p.stat().st_mtime_ns for s, p in store.scan_shards(out).items()} == after
    assert_same_study(local_study, out)


def test_a_task_failing_once_is_retried(induction_run, steps, local_study, ray_instance, tmp_path, inject_fault):
    attempts = tmp_path / "attempts"
    inject_fault(f"step@{steps[2]}:fail:1:{attempts}")
    out = tmp_path / "retried"
    sweep(induction_run, "induction", out, steps=spec(steps), executor="ray", workers=2, **KW)
    assert len(list(attempts.glob(f"step{steps[2]}-attempt*"))) == 2
    assert_same_study(local_study, out)


def test_a_task_that_keeps_failing_is_reported_and_the_others_land(induction_run, steps, ray_instance, tmp_path,
                                                                    inject_fault):
    inject_fault(f"step@{steps[1]}:fail:99:{tmp_path / 'attempts'}")
    out = tmp_path / "failing"
    with pytest.raises(CircuitsError, match=rf"^step {steps[1]} failed on Ray after 3 attempts: RuntimeError: injected"):
        sweep(induction_run, "induction", out, steps=spec(steps), executor="ray", workers=2, **KW)
    others = [steps[0], steps[2], steps[3]]
    assert sorted(store.scan_shards(out)) == others
    assert not list((out / store.SHARD_DIR).glob(".*tmp*"))  # no temporary file left behind
    assert store.open_study(out).steps == others
    inject_fault(None)
    sweep(induction_run, "induction", out, steps=spec(steps), executor="ray", workers=2, **KW)
    assert sorted(store.scan_shards(out)) == steps


def test_local_failure_leaves_the_landed_shards(induction_run, steps, tmp_path, inject_fault):
    inject_fault(f"step@{steps[2]}:fail:1:{tmp_path / 'attempts'}")
    out = tmp_path / "local-fail"
    with pytest.raises(RuntimeError, match=f"injected failure at step {steps[2]}"):
        sweep(induction_run, "induction", out, steps=spec(steps), **KW)
    assert sorted(store.scan_shards(out)) == steps[:2]
    sweep(induction_run, "induction", out, steps=spec(steps), **KW)  # second attempt passes
    assert sorted(store.scan_shards(out)) == steps


def test_executor_options_are_checked(induction_run, tmp_path):
    with pytest.raises(CircuitsError, match="--executor 'dask': expected one of local, ray"):
        sweep(induction_run, "induction", tmp_path / "s", steps="0", executor="dask", **KW)
    with pytest.raises(CircuitsError, match="--workers 2: the local executor runs one step at a time; use --executor ray"):
        sweep(induction_run, "induction", tmp_path / "s", steps="0", workers=2, **KW)
    assert not (tmp_path / "s").exists()  # refused before anything touched the disk
    with pytest.raises(CircuitsError, match="--ray-address needs --executor ray"):
        SweepConfig(ray_address="auto")
    with pytest.raises(CircuitsError, match="--workers 0: must be at least 1"):
        sweep(induction_run, "induction", tmp_path / "s", steps="0", executor="ray", workers=0, **KW)
    assert isinstance(make_executor(SweepConfig()), LocalExecutor)


def fake_ray(resources: dict[str, float]) -> types.SimpleNamespace:
    """A stand-in for the ``ray`` module: an already-running cluster with ``resources``.

    Records the options of the remote task, the spec put in the object store and how many
    steps were in flight each time the executor waited; a task returns its step at once."""
    seen = types.SimpleNamespace(options={}, put=[], in_flight=[], shutdown=False)

    class Remote:
        def options(self, **kwargs):
            seen.options = kwargs
            return self

        def remote(self, spec_ref, step):
            return ("ref", step)

    def wait(refs, num_returns=1, timeout=None):
        seen.in_flight.append(len(refs))
        return ([], refs) if timeout == 0 else (refs[:num_returns], refs[num_returns:])

    return types.SimpleNamespace(
        seen=seen,
        is_initialized=lambda: True,
        cluster_resources=lambda: dict(resources),
        remote=lambda fn: Remote(),
        put=lambda obj: seen.put.append(obj) or "spec-ref",
        wait=wait,
        get=lambda ref: ref[1],
        shutdown=lambda: setattr(seen, "shutdown", True),
        exceptions=types.SimpleNamespace(RayError=RuntimeError),
    )


@dataclass(frozen=True)
class _Plan:
    device: str = "cpu"


@dataclass(frozen=True)
class _Spec:  # RayExecutor.run only needs a dataclass whose ``plan`` has a ``device``
    plan: _Plan = _Plan()


def test_ray_executor_requests_a_gpu_per_task_on_cuda(monkeypatch):
    ray = fake_ray({"CPU": 4.0, "GPU": 2.0})
    monkeypatch.setitem(sys.modules, "ray", ray)
    gpu = RayExecutor(device="cuda")
    assert gpu.num_gpus == 1.0 and gpu.workers == 2  # one task per GPU, not per CPU
    assert ray.seen.options["num_gpus"] == 1.0 and ray.seen.options["num_cpus"] == 1
    landed = []
    assert gpu.run(_Spec(), [0, 1, 2, 3, 4], landed.append) == [0, 1, 2, 3, 4]
    assert landed == [0, 1, 2, 3, 4]
    assert ray.seen.put == [_Spec(_Plan(device="cuda"))]  # each task sees its GPU as cuda:0
    assert max(ray.seen.in_flight) == 2  # never more steps in flight than GPUs
    gpu.close()
    assert not ray.seen.shutdown  # a cluster the executor did not start is left running

    assert RayExecutor(device="cuda", num_gpus=0.5).workers == 4  # half a GPU per task: two per GPU
    assert RayExecutor(device="cuda", workers=1).workers == 1
    cpu = RayExecutor()
    assert cpu.num_gpus == 0 and cpu.workers == 4 and ray.seen.options["num_gpus"] == 0
    cpu.run(_Spec(), [7], lambda result: None)
    assert ray.seen.put[-1] == _Spec(_Plan(device="cpu"))


def test_ray_executor_on_cuda_refuses_a_cluster_without_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", fake_ray({"CPU": 4.0}))
    with pytest.raises(CircuitsError, match=r"the Ray cluster has no GPU for --device cuda \(resources: \{'CPU': 4.0\}\)"):
        RayExecutor(device="cuda")
    assert RayExecutor(device="cpu").workers == 4


def test_cli_sweep_on_ray(induction_run, steps, local_study, ray_instance, tmp_path):
    from typer.testing import CliRunner

    from circuits.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["sweep", str(induction_run), "--task", "induction", "--out", str(out),
                                      "--steps", spec(steps), "--n-examples", "4", "--batch-size", "2", "--no-progress",
                                      "--executor", "ray", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "4 steps" in result.output
    assert_same_study(local_study, out, provenance=False)  # the CLI passes its own options (recorded)


# ---------------------------------------------------------------- the benchmark suite


def test_bench_registry_and_all_side_by_side(monkeypatch, capsys):
    from circuits import bench

    assert {"extract", "discover", "app", "scaling", "all"} <= set(bench.BENCHMARKS)
    fake = {
        "fast": bench.Benchmark("fast", "a fake", lambda device="cpu": {"figures": {"r": bench.figure(0.5, "x", goal=1)}}),
        "broken": bench.Benchmark("broken", "fails", lambda device="cpu": 1 / 0),
        "all": bench.BENCHMARKS["all"],
    }
    monkeypatch.setattr(bench, "BENCHMARKS", fake)
    result = bench.run_benchmark("all")
    assert result["figures"] == {"fast: r": bench.figure(0.5, "x", goal=1)}
    assert result["results"]["broken"]["error"].startswith("ZeroDivisionError")
    bench.print_result(result)
    out = capsys.readouterr().out
    assert "fast" in out and "broken" in out and "failed" in out


@pytest.mark.slow
def test_bench_scaling_runs_small(induction_run, ray_instance):
    from circuits.bench import bench_scaling

    result = bench_scaling(run=str(induction_run), short=1, long=2, ray_steps=2, rounds=1, n_examples=2)
    figures = result["figures"]
    assert figures["peak RSS, 2 / 1 steps"]["value"] > 0
    assert 0 < figures["efficiency 2 workers (wall)"]["value"]
    assert figures["ray start-up (ray.init)"]["value"] == pytest.approx(0, abs=1)  # the module's instance was reused


def test_a_bad_input_on_ray_is_reported_without_retries(induction_run, steps, ray_instance, tmp_path, inject_fault):
    attempts = tmp_path / "attempts"
    inject_fault(f"step@{steps[1]}:fail-input:99:{attempts}")
    with pytest.raises(CircuitsError, match=rf"^step {steps[1]} failed on Ray \(a bad input: not retried\): injected"):
        sweep(induction_run, "induction", tmp_path / "bad", steps=spec(steps), executor="ray", workers=2, **KW)
    assert len(list(attempts.glob(f"step{steps[1]}-attempt*"))) == 1
