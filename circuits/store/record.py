"""``study.json``, the study's record: what made the sweep, and the task's prompts and answers.

Written once when a sweep starts (atomically, like every file of a study) and checked field by
field when read, so that a damaged record fails on opening with the field named, not later on
first use. The task is stored as plain lists of token ids and rebuilt as a ``Task`` on demand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from circuits.errors import CircuitsError, short_repr
from circuits.store.format import STUDY_FILE, STUDY_FORMAT, cause, format_error

if TYPE_CHECKING:  # circuits.tasks imports torch: reading a record must not
    from circuits.tasks import Task


def read_study_json(study: Path) -> dict[str, Any] | None:
    """The checked record of the study folder ``study`` (None when it has no ``study.json``)."""
    path = Path(study) / STUDY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
        raise CircuitsError(f"{path}: unreadable study description ({cause(err)})") from None
    if not isinstance(data, dict) or data.get("format") != STUDY_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CircuitsError(format_error(path, "study", found, STUDY_FORMAT))
    _check_record(data, path)
    return data


# Fields of study.json the read API relies on: (path, type, must be positive).
# type[Any], not the union of the kinds: after ``isinstance(value, kind)`` a positive field is an int
# (the table says so), which a union-narrowed value cannot show the type checker.
_RECORD_FIELDS: tuple[tuple[str, type[Any], bool], ...] = (
    ("manifest", str, False), ("dtype", str, False), ("hooks", list, False),
    ("task.name", str, False), ("task.prompt_hash", str, False), ("task.n_examples", int, True),
    ("task.seq_len", int, True), ("task.arrays", dict, False), ("task.arrays.clean", list, False),
    ("task.arrays.corrupted", list, False), ("model.n_layers", int, True), ("model.n_heads", int, True),
    ("model.graph", dict, False),
)


def _check_record(data: dict[str, Any], path: Path) -> None:
    for field, kind, positive in _RECORD_FIELDS:
        value: Any = data
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (positive and value < 1):
            raise CircuitsError(f"{path}: damaged study description, field {field!r} is {short_repr(value)}, "
                                f"expected {'a positive ' if positive else 'a '}{kind.__name__}")
    if not isinstance(data.get("keep_logits"), bool):  # a resumed sweep compares it with its own setting
        raise CircuitsError(f"{path}: damaged study description, field 'keep_logits' is "
                            f"{short_repr(data.get('keep_logits'))}, expected true or false")
    if not all(isinstance(h, str) for h in data["hooks"]):
        raise CircuitsError(f"{path}: damaged study description, field 'hooks' must list hook names")


def write_study_json(study: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as the study's record, atomically (a temporary file renamed into place)."""
    path = Path(study) / STUDY_FILE
    tmp = path.with_name(f".{STUDY_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def task_arrays(task: Task) -> dict[str, np.ndarray]:
    """The task's tensors as int64 arrays, named as stored (``task/...``).

    ``correct`` and ``wrong`` are [n, n_ans], or [n, n_ans, k] answer sets padded with -1;
    ``lengths`` [n] (right-padded prompts only) is each prompt's real length: positions at
    and beyond it are padding in every per-position array of the study. Studies written
    before sets and padding existed have 2-D answers and no ``lengths``, and read the same.
    """
    import torch  # here, not at the top: only the sweep (which has torch loaded) calls this

    out = {}
    for name in ("clean", "corrupted", "answer_pos", "correct", "wrong", "lengths"):
        tensor = getattr(task, name)
        if tensor is not None:
            out[name] = tensor.detach().cpu().to(dtype=torch.int64).numpy()
    return out


def task_from_record(record: dict[str, Any]) -> Task:
    """Rebuild the Task stored in study.json (prompts, answers, metric, options, lengths).

    A user metric is stored by name: it is the registered function when this process has
    registered that name, else an ``UnavailableMetric`` (the arrays read, computing says why not).
    """
    import torch  # here, not at the top: opening a study for its arrays needs no torch

    from circuits.tasks import METRIC_NAMES, METRICS, Task, UnavailableMetric

    arrays = {k: torch.tensor(np.asarray(v, dtype=np.int64)) for k, v in record["arrays"].items()}
    name = record.get("metric", "logit_diff")
    metric = name if name in METRIC_NAMES or name in METRICS else UnavailableMetric(str(name))
    return Task(record["name"], arrays["clean"], arrays["corrupted"], arrays["answer_pos"], arrays["correct"],
                arrays.get("wrong"), metric, tuple(record.get("prompts", ())),
                dict(record.get("options", {})), arrays.get("lengths"))
