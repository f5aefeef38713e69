"""SIGKILL a sweep at many points, resume each time: the study ends equal to an uninterrupted one.

A killed sweep may cost the step in progress, never the study: after every kill the study
opens, every step it lists reads (no shard without its completion mark is ever read), the
index opens, and the final study equals, bit for bit, one swept without interruption.

Starting Python + torch + TransformerLens costs seconds on a loaded machine, so one helper
process (the "zygote") imports everything once and forks a child per sweep; the test kills
the child. Kills land at named points through ``CIRCUITS_FAULT`` (``circuits.faults``: the
writer pauses there and says so on stderr), at the model's forward pass (a forward pre-hook
in the child), and after plain delays.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the codecs for h5py
import numpy as np
import pytest
from study_helpers import assert_same_study, spread

import circuits
from circuits import faults, store

N_STEPS = 7
N_EXAMPLES = 8
BATCH = 4  # two batches per step: a kill can land between them
MARK = faults.MARK  # what a paused writer prints; the forward pre-hook below prints the same

# Kill plan, in order: a named point of the writer, the forward pass, or a delay in seconds
# after the child starts. Points are counted from each resumed run's start; the early ones
# land before any shard does, the later ones land (or kill right after landing) one at a time.
PLAN = [
    "forward@1",   # first forward pass of the first pending step
    "delay:0.05",  # while starting: loading the checkpoint, building the task
    "batch@1",     # half of the first batch written into the temporary shard
    "batch@2",     # the step's second batch
    "finish@1",    # shard flushed, completion mark not yet written
    "forward@3",   # the second batch's clean forward pass
    "delay:0.15",
    "landed@1",    # shard renamed into place, index not yet rebuilt
    "delay:0.3",
    "index@1",     # temporary index half written (after a landing, or at the start when none is pending)
    "batch@3",     # the second pending step's first batch
    "finish@2",    # the second pending step's completion
    "landed@2",
    "index@1",
]

ZYGOTE = r"""
import json, os, sys, time, traceback
os.environ.setdefault("OMP_NUM_THREADS", "1")
import h5py, hdf5plugin, numpy, torch, yaml, tqdm.auto  # noqa
import circuits.sweep, circuits.loading, circuits.checkpoint, circuits.detectors, circuits.progress  # noqa
import transformer_lens.model_bridge.sources._bridge_builder  # noqa
import transformer_lens.model_bridge.sources.native.model  # noqa
print("ready", flush=True)

def pause_at_forward(nth):
    import circuits.loading as loading
    original, count = loading.load, [0]
    def load(*args, **kwargs):
        model = original(*args, **kwargs)
        def pre(module, inputs):
            count[0] += 1
            if count[0] == nth:
                print(f"circuits-fault: forward@{nth}", file=sys.stderr, flush=True)
                time.sleep(600)
        model.register_forward_pre_hook(pre)
        return model
    loading.load = load

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(1, 2)  # markers and tracebacks come back on the one pipe the test reads
        code = 1
        try:
            if job.get("fault"):
                os.environ["CIRCUITS_FAULT"] = job["fault"]  # circuits.faults.ENV
            if job.get("forward"):
                pause_at_forward(job["forward"])
            from circuits.sweep import sweep
            sweep(**job["args"])
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    print(f"pid {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"done {pid} {status}", flush=True)
"""


class Zygote:
    """One warm interpreter forking a sweep per ``start``; lines it prints arrive on a queue."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop(faults.ENV, None)
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.expect(lambda line: line == "ready", timeout=300)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<eof>")

    def expect(self, match, timeout: float) -> str | None:
        """The first line matching ``match``; None when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            self.log.append(line)
            assert line != "<eof>", "the helper process died:\n" + "\n".join(self.log[-40:])
            if match(line):
                return line

    def start(self, args: dict, fault: str | None = None, forward: int | None = None) -> int:
        self.proc.stdin.write(json.dumps({"args": args, "fault": fault, "forward": forward}) + "\n")
        self.proc.stdin.flush()
        return int(self.expect(lambda line: line.startswith("pid "), timeout=60).split()[1])

    def wait(self, pid: int, timeout: float = 300) -> int:
        line = self.expect(lambda line: line.startswith(f"done {pid} "), timeout)
        assert line is not None, f"sweep {pid} did not end:\n" + "\n".join(self.log[-40:])
        return int(line.split()[2])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def sweep_args(run: Path, out: Path) -> dict:
    return {"manifest": str(run), "task": "induction", "out": str(out), "steps": spread(run, N_STEPS), "n_examples": N_EXAMPLES,
            "batch_size": BATCH, "method": "none", "progress": False}


def run_with_fault(zygote: Zygote, args: dict, item: str) -> tuple[bool, str]:
    """Run one sweep, SIGKILL it at ``item``; (killed, where it was killed)."""
    if item.startswith("delay:"):
        pid = zygote.start(args)
        delay = float(item.split(":")[1])
        if zygote.expect(lambda line: line.startswith(f"done {pid} "), timeout=delay) is not None:
            return False, item  # finished before the delay
        where = item
    else:
        name = item.partition("@")[0]
        if name == "forward":
            pid = zygote.start(args, forward=int(item.split("@")[1]))
        else:
            pid = zygote.start(args, fault=f"{item}:pause")
        hit = zygote.expect(lambda line: line.startswith(MARK) or line.startswith(f"done {pid} "), timeout=300)
        assert hit is not None, f"{item}: the sweep neither reached the point nor ended:\n" + "\n".join(zygote.log[-40:])
        if not hit.startswith(MARK):
            assert hit.split()[2] == "0", "\n".join(zygote.log[-40:])
            return False, item  # nothing left to do at that point
        where = hit[len(MARK):]
    os.kill(pid, signal.SIGKILL)
    status = zygote.wait(pid, timeout=60)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (item, status)
    return True, where


def check_after_kill(out: Path, selected: list[int]) -> list[int]:
    """The study opens, lists only complete shards, reads every listed step; the index opens."""
    if not (out / store.STUDY_FILE).exists():
        return []
    with circuits.open_study(out) as study:
        assert study.problems == {}, study.problems  # a killed writer never leaves a damaged shard in place
        assert set(study.steps) <= set(selected)
        for step in study.steps:
            with h5py.File(out / store.SHARD_DIR / store.shard_name(step), "r") as f:
                assert f.attrs["complete"]
            assert study.pattern(step, 1, 0, N_EXAMPLES - 1).shape == (33, 33)
            assert np.isfinite(study.array_at(step, "outputs/metric_clean")).all()
        if study.steps:
            assert study.metric().shape == (len(study.steps),)
            assert study.array("heads/induction").shape[0] == len(study.steps)
        steps = list(study.steps)
    if (out / store.INDEX_FILE).exists():
        with h5py.File(out / store.INDEX_FILE, "r") as index:
            assert index.attrs["format"] == store.INDEX_FORMAT
            listed = [int(s) for s in index["steps"][()]]
            assert set(listed) <= set(steps)  # the index may lag a landed shard, never lead
            if listed:
                patterns = index[store.PATTERNS][:, 0, 1, 0]
                assert np.isfinite(patterns).all() and patterns.shape[0] == len(listed)
    return steps


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def test_sigkill_at_many_points_then_resume_gives_the_uninterrupted_study(induction_run, tmp_path, zygote):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert zygote.wait(zygote.start(sweep_args(induction_run, reference))) == 0
    selected = [int(s) for s in spread(induction_run, N_STEPS).split(",")]

    kills: list[str] = []
    landed_after: list[int] = []
    for item in PLAN:
        killed, where = run_with_fault(zygote, sweep_args(induction_run, out), item)
        if killed:
            kills.append(where)
        landed_after.append(len(check_after_kill(out, selected)))
    assert zygote.wait(zygote.start(sweep_args(induction_run, out))) == 0  # the resume that finishes

    assert len(kills) >= 10, kills
    assert {k.partition("@")[0] for k in kills} >= {"forward", "batch", "finish", "landed", "index"}, kills
    assert landed_after == sorted(landed_after)  # a kill never loses a landed step
    assert check_after_kill(out, selected) == selected
    assert_same_study(out, reference)
