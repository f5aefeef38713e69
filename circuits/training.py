"""Checkpoints of your own training loop, in our layout, ready to sweep while the run trains.

Plain PyTorch::

    saver = CheckpointSaver("runs/mine", tl_config, tokens_per_step=64 * 33, total_steps=1000,
                            follow=True, task="induction", out="studies/mine")
    for step in range(1001):
        saver.maybe_save(model, step)       # saves on the schedule (log-then-linear by default)
        ...                                 # one optimiser step
    # the schedule's last step also writes RUN/training.done; saver.finish() does it earlier

Hugging Face ``Trainer``: ``Trainer(..., callbacks=[CheckpointCallback("runs/mine", seq_len=128)])``.

Both write through ``circuits.runs.RunWriter``: each checkpoint under a temporary name then
renamed into place, the manifest rewritten atomically with the steps written so far, the
completion marker last. ``follow=True`` starts ``circuits sweep RUN --follow`` in the
background (``start_follower``), its output in ``RUN/follow.log``. In a multi-process job, save
from one process only (the callback does: the world's process zero).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from circuits.errors import CircuitsError
from circuits.follow import FOLLOW_LOG
from circuits.runs import RunWriter
from circuits.steps import log_then_linear

CHECKPOINTS = 40  # a default schedule's linear part: about this many checkpoints over the run


def default_schedule(total_steps: int, checkpoint_every: int | None = None) -> list[int]:
    """Log-then-linear (``circuits.steps.log_then_linear``): 0, 1, 2, 4, ... then every
    ``checkpoint_every`` steps (default: ``total_steps / 40``) to ``total_steps``."""
    every = checkpoint_every if checkpoint_every is not None else max(1, total_steps // CHECKPOINTS)
    return log_then_linear(total_steps, every)


def _schedule(schedule: Sequence[int] | None, total_steps: int | None, checkpoint_every: int | None) -> list[int]:
    if schedule is not None:
        steps = sorted({int(s) for s in schedule})
        if not steps or steps[0] < 0 or len(steps) != len(list(schedule)):
            raise CircuitsError(f"schedule {list(schedule)[:8]!r}: expected distinct steps >= 0, at least one")
        return steps
    if total_steps is None:
        raise CircuitsError("CheckpointSaver: give schedule= (the steps to save) or total_steps= (for a "
                            "log-then-linear schedule)")
    return default_schedule(total_steps, checkpoint_every)


def start_follower(run_dir: str | Path, task: str | Path, out: str | Path, *, sweep_args: Sequence[str] = (),
                   idle: float | None = None, poll: float | None = None) -> subprocess.Popen:
    """``circuits sweep RUN --task TASK --out OUT --follow`` as a background process, its output
    appended to ``RUN/follow.log``. ``sweep_args``: more options, e.g. ``["--method", "eap-ig"]``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "circuits", "sweep", str(run_dir), "--task", str(task), "--out", str(out),
               "--follow", "--no-progress", *map(str, sweep_args)]
    if idle is not None:
        command += ["--idle", str(idle)]
    if poll is not None:
        command += ["--poll", str(poll)]
    log: IO[bytes] = open(run_dir / FOLLOW_LOG, "ab")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # not killed by the training job's Ctrl-C
    finally:
        log.close()  # the child has its own descriptor


class CheckpointSaver:
    """Saves a training loop's model on a schedule into a run folder of our layout.

    ``model_or_config``: the TransformerLens config of the TL-native module you train (a dict
    or ``TransformerBridgeConfig``), or the Hugging Face model (or bridge) itself.
    ``schedule``: the steps to save; default ``default_schedule(total_steps, checkpoint_every)``.
    ``follow=True`` (with ``task`` and ``out``) starts a follower that sweeps each checkpoint as
    it lands. A folder that already holds this run takes new steps (a resumed training job);
    steps saved before are not saved again.
    """

    def __init__(self, run_dir: str | Path, model_or_config: Any, *, tokens_per_step: int | None = None,
                 schedule: Sequence[int] | None = None, total_steps: int | None = None,
                 checkpoint_every: int | None = None, tokenizer: Any = None, name: str | None = None,
                 description: str = "", follow: bool = False, task: str | Path | None = None,
                 out: str | Path | None = None, sweep_args: Sequence[str] = (), idle: float | None = None,
                 poll: float | None = None) -> None:
        self.schedule = _schedule(schedule, total_steps, checkpoint_every)
        self.writer = RunWriter(run_dir, tokens_per_step=tokens_per_step, name=name, description=description)
        if self.writer.finished:
            raise CircuitsError(f"{self.writer.run_dir}: this run is finished (training.done is there); remove "
                                "that file to add checkpoints, or save into another folder")
        is_model = hasattr(model_or_config, "state_dict") or hasattr(model_or_config, "original_model")
        self.config = None if is_model else model_or_config
        self.tokenizer = tokenizer
        self.follower: subprocess.Popen | None = None
        if follow:
            if task is None or out is None:
                raise CircuitsError("CheckpointSaver(follow=True) needs task= and out= (the study folder)")
            self.follower = start_follower(run_dir, task, out, sweep_args=sweep_args, idle=idle, poll=poll)

    @property
    def run_dir(self) -> Path:
        return self.writer.run_dir

    def due(self, step: int) -> bool:
        """``step`` is on the schedule and not saved yet."""
        return step in self.schedule and not self.writer.has(step)

    def maybe_save(self, model: Any, step: int) -> Path | None:
        """Save ``model`` as ``step`` when the schedule says so; its folder, else None.

        Saving the schedule's last step also marks the run finished."""
        if not self.due(step):
            return None
        path = self.writer.add(model, int(step), config=self.config, tokenizer=self.tokenizer)
        if step == self.schedule[-1]:
            self.finish()
        return path

    def finish(self) -> None:
        """Mark the run finished (``training.done``): the follower stops once it has every checkpoint."""
        self.writer.finish()

    def wait_follower(self, timeout: float | None = None) -> int | None:
        """Wait for the follower to end (None when none was started); its exit status."""
        if self.follower is None:
            return None
        return self.follower.wait(timeout)

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:  # a training loop that raised is not finished: its follower idles out
            self.finish()


def _callback_class() -> type:
    """``CheckpointCallback``, built on first use: importing transformers takes seconds."""
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        """A Hugging Face ``Trainer`` callback saving the model in our layout on a schedule.

        ``tokens_per_step``, or ``seq_len`` to compute it (batch per device x gradient
        accumulation x processes x ``seq_len``). ``schedule`` default: log-then-linear over
        the Trainer's ``max_steps``. Step 0 (the initial weights) is saved when training begins;
        the run is marked finished when training ends. Other arguments as ``CheckpointSaver``.
        """

        def __init__(self, run_dir: str | Path, *, tokens_per_step: int | None = None, seq_len: int | None = None,
                     schedule: Sequence[int] | None = None, checkpoint_every: int | None = None,
                     tokenizer: Any = None, **saver_options: Any) -> None:
            if tokens_per_step is None and seq_len is None:
                raise CircuitsError("CheckpointCallback: give tokens_per_step= or seq_len= (tokens per example)")
            self.run_dir, self.tokens_per_step, self.seq_len = Path(run_dir), tokens_per_step, seq_len
            self.schedule, self.checkpoint_every, self.tokenizer = schedule, checkpoint_every, tokenizer
            self.saver_options = saver_options
            self.saver: CheckpointSaver | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            tokens = self.tokens_per_step or (args.per_device_train_batch_size * args.gradient_accumulation_steps
                                              * max(1, args.world_size) * int(self.seq_len or 0))
            schedule = self.schedule or default_schedule(int(state.max_steps), self.checkpoint_every)
            tokenizer = self.tokenizer if self.tokenizer is not None else kwargs.get("processing_class")
            self.saver = CheckpointSaver(self.run_dir, model, tokens_per_step=tokens, schedule=schedule,
                                         tokenizer=tokenizer, **self.saver_options)
            self.saver.maybe_save(model, int(state.global_step))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.saver is not None:
                self.saver.maybe_save(model, int(state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            if self.saver is not None:
                self.saver.finish()

    return CheckpointCallback


_CALLBACK: list[type] = []


def __getattr__(name: str) -> Any:
    if name == "CheckpointCallback":
        if not _CALLBACK:
            _CALLBACK.append(_callback_class())
        return _CALLBACK[0]
    raise AttributeError(f"module 'circuits.training' has no attribute {name!r}")
