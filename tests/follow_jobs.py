"""The two processes of tests/test_follow.py (holds no tests): a training job writing checkpoints
with ``CheckpointSaver``, and a follower (``sweep(..., follow=True)``) that logs every visit.

    python tests/follow_jobs.py train RUN RELEASE_FILE
    python tests/follow_jobs.py follow RUN STUDY VISITS_LOG [HANG_FILE HANG_AT]

The training job writes the first ``FIRST_PART`` checkpoints, waits for ``RELEASE_FILE`` to
appear, then writes the rest (pausing a little after each: a run still training). The
follower appends ``PID STEP`` to ``VISITS_LOG`` as each visit begins; given ``HANG_FILE`` and
``HANG_AT`` it writes ``HANG_FILE`` at its HANG_AT-th visit and then hangs there, so that a
test can kill it in the middle of a visit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# A tiny attention-only TL-native model, trained on repeated random tokens.
TL_CONFIG = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_head": 8, "n_ctx": 17, "d_vocab": 16,
             "attn_only": True, "normalization_type": "LN", "act_fn": "relu",
             "positional_embedding_type": "standard", "seed": 0}
SCHEDULE = [0, 1, 2, 4, 8, 12, 16, 20]
FIRST_PART = 4
BATCH = 8
PAUSE = 0.2  # seconds after each checkpoint
WAIT_LIMIT = 600.0  # a training job whose test has gone away gives up waiting


def sweep_settings() -> dict:
    """What the follower (and a test's reference sweep) run: a few prompts, no cached activations."""
    return {"hooks": "none", "n_examples": 4, "dtype": "float32", "progress": False}


def visited_step(ctx) -> dict:
    """The analysis both sweeps run: the step, as the shard's own record of its visit."""
    import numpy as np

    return {"step": np.int64(ctx.step)}


def train(run: Path, release: Path) -> None:
    import torch
    import torch.nn.functional as F

    from circuits.checkpoint import new_native_model
    from circuits.recipes.induction import repeated_tokens
    from circuits.training import CheckpointSaver

    torch.manual_seed(0)
    model = new_native_model(TL_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    saver = CheckpointSaver(run, TL_CONFIG, tokens_per_step=BATCH * TL_CONFIG["n_ctx"], schedule=SCHEDULE)
    for step in range(SCHEDULE[-1] + 1):
        if saver.maybe_save(model, step) is not None:
            time.sleep(PAUSE)
            if len(saver.writer.steps) == FIRST_PART:
                _wait_for(release)
        if step == SCHEDULE[-1]:
            break  # the last scheduled save also wrote training.done
        tokens = repeated_tokens(BATCH, 8, TL_CONFIG["d_vocab"], generator)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _wait_for(path: Path) -> None:
    waited = 0.0
    while not path.exists() and waited < WAIT_LIMIT:
        time.sleep(0.05)
        waited += 0.05


def follow(run: Path, study: Path, visits: Path, hang_file: Path | None, hang_at: int) -> None:
    from circuits.sweep import sweep

    count = 0

    def logged_visit(ctx) -> dict:
        nonlocal count
        count += 1
        with open(visits, "a") as f:
            f.write(f"{os.getpid()} {ctx.step}\n")
        if hang_file is not None and count == hang_at:
            hang_file.write_text(str(ctx.step))
            time.sleep(WAIT_LIMIT)  # killed here by the test
        return visited_step(ctx)

    sweep(run, "induction", study, follow=True, idle=WAIT_LIMIT, poll=0.1, analyses=[("visit", logged_visit)],
          **sweep_settings())


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    if job == "train":
        train(Path(args[0]), Path(args[1]))
    else:
        hang = Path(args[3]) if len(args) > 3 else None
        follow(Path(args[0]), Path(args[1]), Path(args[2]), hang, int(args[4]) if len(args) > 4 else 0)
