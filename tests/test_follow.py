"""Following a run in training: ``sweep --follow`` visits each checkpoint once as it lands, keeps
the study current, stops when the run is done, and loses nothing when killed and restarted;
``CheckpointSaver`` and the Trainer callback write checkpoints the follower can trust."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

import circuits
from circuits import store
from circuits.checkpoint import new_native_model
from circuits.config import SweepConfig
from circuits.errors import CircuitsError
from circuits.follow import DONE_MARKER, FOLLOW_LOG, checkpoint_complete, trust_steps_so_far
from circuits.steps import log_then_linear
from circuits.sweep import sweep
from circuits.training import CheckpointSaver

sys.path.insert(0, str(Path(__file__).parent))
import follow_jobs  # noqa: E402 - the test's two processes, beside it
from study_helpers import datasets  # noqa: E402

JOBS = Path(__file__).parent / "follow_jobs.py"
WAIT = 300.0  # seconds before a test gives up on a process (a failure, not a measurement)
# Tests on a followed training job or a Trainer run are journeys (``slow``: a minute of processes),
# kept on one xdist worker (``xdist_group``) so that each module fixture runs once.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def wait_until(condition, what: str, limit: float = WAIT) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def job(*args: object, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(JOBS), *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                env=ENV)


def visits_by(log: Path, pid: int) -> list[int]:
    lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return [int(step) for p, step in lines if int(p) == pid]


def shard_files(study: Path) -> dict[int, tuple[int, int]]:
    """Step -> (inode, mtime) of each landed shard: a shard written again gets a new inode."""
    return {step: (path.stat().st_ino, path.stat().st_mtime_ns) for step, path in store.scan_shards(study).items()}


def index_steps(study: Path) -> set[int]:
    try:
        with h5py.File(study / store.INDEX_FILE, "r") as f:
            return {int(s) for s in f["steps"][()]}
    except (OSError, KeyError):  # not written yet, or being replaced
        return set()


@dataclass
class Followed:
    run: Path
    study: Path
    first: subprocess.Popen  # the follower killed mid-visit
    second: subprocess.Popen  # the follower restarted after it
    trainer: subprocess.Popen
    visits: Path
    landed_at_kill: dict[int, tuple[int, int]]
    landed_before_release: set[int]
    index_while_waiting: set[int]  # the index's steps while the job waited for the test


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> Followed:
    """A training job in another process; a follower started before its first checkpoint and
    SIGKILLed in the middle of a visit; a second follower started then, while the job waits,
    and left to follow the rest of the run to its end."""
    tmp = tmp_path_factory.mktemp("follow")
    run, study, visits, hang, release = tmp / "run", tmp / "study", tmp / "visits.log", tmp / "hang", tmp / "release"
    log = tmp / "jobs.log"
    first = job("follow", run, study, visits, hang, 3, log=log)  # before the run folder exists
    trainer = job("train", run, release, log=log)
    try:
        wait_until(hang.exists, "the first follower's third visit")
        first.send_signal(signal.SIGKILL)
        first.wait()
        landed_at_kill = shard_files(study)
        second = job("follow", run, study, visits, log=log)
        part = set(follow_jobs.SCHEDULE[: follow_jobs.FIRST_PART])
        wait_until(lambda: part <= set(store.scan_shards(study)), "the checkpoints written so far")
        landed_before_release = set(store.scan_shards(study))
        wait_until(lambda: index_steps(study) >= landed_before_release, "the index of the shards landed so far")
        index_while_waiting = index_steps(study)
        release.touch()  # the job writes the rest of its checkpoints now
        second.wait(WAIT)
        trainer.wait(WAIT)
    finally:
        for process in (first, trainer, *([second] if "second" in locals() else [])):
            if process.poll() is None:
                process.kill()
    assert trainer.returncode == 0 and second.returncode == 0, log.read_text()[-3000:]
    return Followed(run, study, first, second, trainer, visits, landed_at_kill, landed_before_release,
                    index_while_waiting)


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_followed_study_ends_with_every_checkpoint_of_the_run(followed):
    steps = circuits.load_manifest(followed.run).steps
    assert steps == follow_jobs.SCHEDULE
    study = circuits.open_study(followed.study)
    assert study.steps == steps
    assert [int(study.array_at(s, "visit/step")) for s in steps] == steps  # each shard is its own step's


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_restarted_follower_visits_each_checkpoint_the_first_did_not_land_once(followed):
    second = visits_by(followed.visits, followed.second.pid)
    assert sorted(second) == sorted(set(follow_jobs.SCHEDULE) - set(followed.landed_at_kill))
    assert len(second) == len(set(second))


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_shards_landed_before_the_kill_are_never_written_again(followed):
    assert followed.landed_at_kill  # the kill came after some shards had landed
    now = shard_files(followed.study)
    assert {step: now[step] for step in followed.landed_at_kill} == followed.landed_at_kill


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_restarted_follower_followed_checkpoints_that_landed_after_it_started(followed):
    later = set(follow_jobs.SCHEDULE) - followed.landed_before_release
    assert later and later <= set(visits_by(followed.visits, followed.second.pid))


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_first_follower_waited_for_a_run_that_did_not_exist_yet(followed):
    assert visits_by(followed.visits, followed.first.pid)[0] == follow_jobs.SCHEDULE[0]


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_nothing_is_set_aside_or_left_half_written(followed):
    names = [p.name for p in (followed.study / store.SHARD_DIR).iterdir()]
    assert sorted(names) == sorted(store.shard_name(s) for s in follow_jobs.SCHEDULE)


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_index_and_study_record_describe_the_whole_run(followed):
    with h5py.File(followed.study / store.INDEX_FILE, "r") as f:
        assert list(f["steps"][()]) == follow_jobs.SCHEDULE
        np.testing.assert_array_equal(f["visit/step"][()], follow_jobs.SCHEDULE)
    record = json.loads((followed.study / store.STUDY_FILE).read_text())
    assert record["steps"] == follow_jobs.SCHEDULE
    assert yaml.safe_load(record["manifest"])["steps"] == follow_jobs.SCHEDULE


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_index_is_current_while_the_run_waits_for_its_next_checkpoint(followed):
    assert followed.index_while_waiting == followed.landed_before_release


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_follower_stopped_because_the_run_said_it_was_done(followed):
    # Its --idle was 600 s and it ended well within the test's wait: the marker stopped it.
    assert followed.second.returncode == 0 and (followed.run / DONE_MARKER).exists()


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_a_followed_study_holds_what_a_sweep_of_the_finished_run_holds(followed, tmp_path):
    reference = tmp_path / "reference"
    sweep(followed.run, "induction", reference, analyses=[("visit", follow_jobs.visited_step)],
          **follow_jobs.sweep_settings())
    for step in follow_jobs.SCHEDULE:
        got = datasets(followed.study / store.SHARD_DIR / store.shard_name(step))
        want = datasets(reference / store.SHARD_DIR / store.shard_name(step))
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {step}: {key}")


# ---------------------------------------------------------------- what counts as landed


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return new_native_model(follow_jobs.TL_CONFIG).eval()


def saved_step(tmp_path: Path, step: int = 0) -> Path:
    saver = CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[step, step + 1])
    path = saver.maybe_save(tiny_model(), step)
    assert path is not None
    return path


def test_a_checkpoint_whose_weights_are_still_being_written_is_not_complete(tmp_path):
    path = saved_step(tmp_path)
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 100])
    assert not checkpoint_complete(path)
    weights.write_bytes(whole)
    assert checkpoint_complete(path)


def test_a_checkpoint_without_its_config_is_not_complete(tmp_path):
    path = saved_step(tmp_path)
    (path / "config.json").unlink()
    assert not checkpoint_complete(path)


def test_a_followed_run_is_checked_against_exact_patching_at_doubling_checkpoints_and_its_last():
    steps = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert trust_steps_so_far(steps, 5, finished=False) == [0, 10, 30, 70]  # the 1st, 2nd, 4th, 8th
    assert trust_steps_so_far(steps, 5, finished=True) == [0, 10, 30, 70, 90]
    assert trust_steps_so_far(steps, 0, finished=True) == []


def test_follow_with_a_step_selection_is_refused():
    with pytest.raises(CircuitsError, match=r"--steps 'first:3' with --follow"):
        SweepConfig(follow=True, steps="first:3")


@pytest.mark.parametrize("option", ["idle", "poll"])
def test_follow_times_must_be_positive(option):
    with pytest.raises(CircuitsError, match=rf"--{option} 0: expected a number of seconds above 0"):
        SweepConfig(**{option: 0})


def test_following_a_hub_run_is_refused(tmp_path):
    with pytest.raises(CircuitsError, match="--follow follows a local run still training"):
        sweep("pythia-70m-deduped", "induction", tmp_path / "study", follow=True, progress=False)


def test_a_follower_stops_after_idle_seconds_without_a_checkpoint(tmp_path):
    saver = CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0, 1, 2])
    saver.maybe_save(tiny_model(), 0)  # the run has not finished: only --idle can stop the follower
    done = subprocess.run([sys.executable, "-m", "circuits", "sweep", str(tmp_path / "run"), "--task", "induction",
                           "--out", str(tmp_path / "study"), "--follow", "--idle", "0.5", "--poll", "0.1",
                           "--hooks", "none", "--n-examples", "4", "--no-progress"],
                          capture_output=True, text=True, env=ENV, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert circuits.open_study(tmp_path / "study").steps == [0]


def test_a_follower_with_no_checkpoint_to_follow_says_so(tmp_path):
    with pytest.raises(CircuitsError, match=r"run: --idle 0.2 s passed with no complete checkpoint to follow"):
        sweep(tmp_path / "run", "induction", tmp_path / "study", follow=True, idle=0.2, poll=0.05, progress=False)


def test_a_study_takes_the_grown_manifest_of_its_run(tmp_path):
    saver = CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0, 1])
    saver.maybe_save(tiny_model(0), 0)
    settings = follow_jobs.sweep_settings() | {"analyses": ()}
    sweep(tmp_path / "run", "induction", tmp_path / "study", **settings)
    saver.maybe_save(tiny_model(1), 1)
    study = sweep(tmp_path / "run", "induction", tmp_path / "study", **settings)
    assert study.steps == [0, 1] and study.manifest.steps == [0, 1]


def test_a_manifest_of_another_run_is_still_refused(tmp_path):
    saver = CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0, 1])
    saver.maybe_save(tiny_model(0), 0)
    settings = follow_jobs.sweep_settings() | {"analyses": ()}
    sweep(tmp_path / "run", "induction", tmp_path / "study", **settings)
    path = tmp_path / "run" / "manifest.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"tokens_per_step": 2}))
    with pytest.raises(CircuitsError, match="this study was made with another manifest"):
        sweep(tmp_path / "run", "induction", tmp_path / "study", **settings)


# ---------------------------------------------------------------- the saver


def test_the_saver_lists_in_its_manifest_exactly_the_checkpoints_on_disk(tmp_path):
    run = tmp_path / "run"
    saver = CheckpointSaver(run, follow_jobs.TL_CONFIG, tokens_per_step=3, total_steps=8, checkpoint_every=4)
    model = tiny_model()
    for step in range(9):
        saver.maybe_save(model, step)
        on_disk = sorted(int(p.name[4:]) for p in run.glob("step*"))
        assert circuits.load_manifest(run).steps == on_disk
    assert on_disk == log_then_linear(8, 4)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary left


def test_the_saver_marks_the_run_done_at_its_last_scheduled_step(tmp_path):
    saver = CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0, 5])
    saver.maybe_save(tiny_model(), 0)
    assert not (tmp_path / "run" / DONE_MARKER).exists()
    saver.maybe_save(tiny_model(), 5)
    assert (tmp_path / "run" / DONE_MARKER).exists()


def test_a_resumed_saver_keeps_the_checkpoints_already_written(tmp_path):
    run = tmp_path / "run"
    CheckpointSaver(run, follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0, 1, 2]).maybe_save(tiny_model(0), 0)
    before = (run / "step0" / "model.safetensors").read_bytes()
    resumed = CheckpointSaver(run, follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0, 1, 2])
    assert resumed.maybe_save(tiny_model(1), 0) is None
    resumed.maybe_save(tiny_model(1), 1)
    assert (run / "step0" / "model.safetensors").read_bytes() == before
    assert circuits.load_manifest(run).steps == [0, 1]


def test_a_finished_run_is_refused_by_a_new_saver(tmp_path):
    saver = CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0])
    saver.maybe_save(tiny_model(), 0)
    with pytest.raises(CircuitsError, match=r"run: this run is finished \(training.done is there\)"):
        CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1, schedule=[0, 1])


def test_a_saver_without_a_schedule_or_a_length_is_refused(tmp_path):
    with pytest.raises(CircuitsError, match="give schedule= .* or total_steps="):
        CheckpointSaver(tmp_path / "run", follow_jobs.TL_CONFIG, tokens_per_step=1)


# ---------------------------------------------------------------- the Trainer callback


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (n, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class _LogitsAtEachStep:
    """Records the model's logits on fixed tokens after every optimiser step (and at the start)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens, self.logits = tokens, {}

    def record(self, model, step: int) -> None:
        with torch.no_grad():
            self.logits[step] = model(self.tokens).logits.clone()


@pytest.fixture(scope="module")
def trained_with_callback(tmp_path_factory):
    """Six steps of ``Trainer`` on a tiny GPT-NeoX, saved by the callback, followed in the background."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from circuits.training import CheckpointCallback

    tmp = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=32))
    probe = _LogitsAtEachStep(torch.randint(0, 32, (2, 17), generator=torch.Generator().manual_seed(1)))

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            probe.record(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            probe.record(model, state.global_step)

    saver_callback = CheckpointCallback(tmp / "run", seq_len=17, schedule=[0, 1, 2, 4, 6], follow=True,
                                        task="induction", out=tmp / "study", idle=600, poll=0.1,
                                        sweep_args=["--hooks", "none", "--n-examples", "4"])
    args = TrainingArguments(output_dir=str(tmp / "trainer-out"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Sequences(24, 17, 32),
                      callbacks=[Record(), saver_callback])  # Record first: it sees each step before the save
    trainer.train()
    assert saver_callback.saver.wait_follower(WAIT) == 0, (tmp / "run" / FOLLOW_LOG).read_text()[-3000:]
    return tmp, probe


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_trainer_callback_saves_each_scheduled_step_with_its_models_logits(trained_with_callback):
    tmp, probe = trained_with_callback
    manifest = circuits.load_manifest(tmp / "run")
    assert manifest.steps == [0, 1, 2, 4, 6] and manifest.tokens_per_step == 4 * 17
    for step in manifest.steps:
        with torch.no_grad():
            got = circuits.load(manifest, step)(probe.tokens)
        torch.testing.assert_close(got, probe.logits[step], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.xdist_group("follow")
def test_the_trainer_callback_marks_the_run_done_and_its_follower_studies_every_step(trained_with_callback):
    tmp, _ = trained_with_callback
    assert (tmp / "run" / DONE_MARKER).exists()
    assert circuits.open_study(tmp / "study").steps == [0, 1, 2, 4, 6]
