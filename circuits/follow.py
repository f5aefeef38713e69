"""Following a run that is still training: when a checkpoint counts as landed, when the run is over.

This is the contract between a training job that writes checkpoints (``circuits.training``,
or any writer of our layout) and ``circuits sweep --follow`` (``circuits.sweep``), which reads it:

- a step counts once it is listed in the run's ``manifest.yaml`` (rewritten atomically as
  checkpoints land) and its checkpoint is complete: its folder is in place (our writers build
  it under a temporary name and rename it, so the name is the completion mark) and every
  ``.safetensors`` file in it is whole (its header reads and the file is as long as the header
  says: a writer that is not atomic, such as Hugging Face ``Trainer``, is caught mid-write);
- the run is over once ``RUN/training.done`` exists (written last, after the final manifest).

Pure file checks, no torch: a poll costs a few ``stat`` calls and header reads per new step.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from circuits.errors import CircuitsError
from circuits.manifest import Manifest

DONE_MARKER = "training.done"  # in the run folder (beside manifest.yaml): no more checkpoints will come
FOLLOW_LOG = "follow.log"  # where a follower started by circuits.training writes its output
SHARDED_INDEX = "model.safetensors.index.json"  # Hugging Face's list of a sharded checkpoint's files
_HEADER_MAX = 100 * 2**20  # safetensors refuses headers above 100 MB too


def run_folder(manifest: Manifest) -> Path:
    """The folder holding the run's ``manifest.yaml`` (and its completion marker)."""
    if manifest.origin is None or not Path(manifest.origin).is_file():
        raise CircuitsError(f"manifest {manifest.name}: --follow needs the run's manifest file on disk "
                            f"(read from {manifest.origin or 'memory'}); pass the run folder")
    return Path(manifest.origin).parent


def run_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / DONE_MARKER).exists()


def safetensors_whole(path: Path) -> bool:
    """True when ``path`` is a complete safetensors file: its header is JSON and the file is
    exactly as long as the header's last tensor needs (a file still being written is shorter)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_MAX:
                return False
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(header, dict):
        return False
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
            and len(t["data_offsets"]) == 2 and isinstance(t["data_offsets"][1], int)]
    return size == 8 + n + max(ends, default=0)


def checkpoint_complete(path: Path) -> bool:
    """A step's checkpoint (a folder, or a single ``.safetensors`` file) is all there."""
    if path.is_file():
        return path.suffix == ".safetensors" and safetensors_whole(path)
    if not path.is_dir():
        return False
    config = path / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    weights = sorted(path.glob("*.safetensors"))
    index = path / SHARDED_INDEX
    if index.exists():  # a sharded checkpoint: every file its index names must be there and whole
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return False
        weights = [path / name for name in sorted(names)]
    return bool(weights) and all(safetensors_whole(w) for w in weights)


def step_ready(manifest: Manifest, step: int) -> bool:
    """The checkpoint of ``step`` is complete where the loader will look for it."""
    from circuits.loading import checkpoint_dir

    try:
        path = checkpoint_dir(manifest, step)
    except CircuitsError:  # not in place yet (or never will be: then it is never ready)
        return False
    return checkpoint_complete(path)


def trust_steps_so_far(steps: list[int], n: int, finished: bool) -> list[int]:
    """Where a followed run's circuit is checked against exact patching.

    A sweep spreads its ``n`` checks over the steps it selected, the last included; a follower
    does not know the last step until the run ends. So: the 1st, 2nd, 4th, 8th, ... checkpoint
    (``n - 1`` of them, early training is where circuits change most), and the run's last
    checkpoint when the run has finished before it is visited. ``steps``: the run's
    checkpoints so far, sorted.
    """
    if n <= 0 or not steps:
        return []
    chosen = {steps[2**k - 1] for k in range(n - 1) if 2**k - 1 < len(steps)}
    if finished:
        chosen.add(steps[-1])
    return sorted(chosen)


@dataclass
class IdleClock:
    """Stops a follower after ``idle`` seconds of polls that found nothing new.

    The clock restarts after each visit: a visit longer than ``idle`` is work, not idleness.
    """

    idle: float
    poll: float
    since: float = field(default_factory=time.monotonic)

    def restart(self) -> None:
        self.since = time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() - self.since >= self.idle

    def wait(self) -> None:
        left = self.idle - (time.monotonic() - self.since)
        time.sleep(max(0.0, min(self.poll, left)))
