"""Task files: a task as rows of a JSONL or CSV file (``circuits sweep RUN --task PATH``).

One row is one example. Prompts are text, tokenised with the model's own tokenizer (with
its BOS token first when the model prepends one, as the built-in IOI task does), or, in
JSONL, lists of token ids taken as they are. Each row's clean and corrupted prompts must
have the same number of tokens; rows of different lengths are right-padded to the longest
(``Task.lengths`` keeps each row's length): exact for causal models, refused for
bidirectional ones. The task is named after the file (its stem).

JSONL, one object per line (blank lines skipped; ``row N`` in a message is line N)::

    {"clean": "When Mary and John went out, John gave it to", "corrupted": "When Anne and Paul went out, Eve gave it to",
     "correct": " Mary", "wrong": [" John", " Paul"]}
    {"clean": [5, 9, 2], "corrupted": [7, 9, 2], "answer_pos": [0, -1], "correct": [4, [3, 6]], "wrong": [2, 1]}

- ``correct`` (required), ``wrong`` (optional): an answer, or a list of answers read at one
  position. An answer is a token id or a text that is exactly one token (mind the space:
  ``" Mary"``). With ``answer_pos`` a list of positions, ``correct`` and ``wrong`` are lists
  of the same length, one answer (or list of answers) per position.
- ``answer_pos``: a position in the row's own prompt, negative from its end; default -1,
  the last real token (the one that predicts the answer).
- ``metric``: any of ``circuits.tasks.METRIC_NAMES`` or a registered name; every row that
  names one names the same. Default ``logit_diff`` (``prob_diff`` for greater-than files).

CSV, with a header (``row N`` in a message is the N-th row after it); columns other than
these are ignored. EAP-IG's layouts read as they are:

- IOI (``clean, corrupted, correct_idx, incorrect_idx``): ``correct_idx`` and
  ``incorrect_idx`` are token ids of the model's tokenizer (the indirect object and the
  subject), read at the last token; metric ``logit_diff``, their logit difference.
- greater-than (``clean, corrupted, label``): ``label`` is the start year's last two digits
  YY (0..98). Correct: the two-digit year tokens ``YY+1 .. 99``, wrong: ``00 .. YY`` (each
  must be one token, e.g. ``"32"``); metric ``prob_diff``, ``sum p(years > YY) - sum
  p(years <= YY)`` at the last token: EAP-IG's ``prob_diff`` for greater-than.
- ours (``clean, corrupted, correct[, wrong][, answer_pos][, metric]``): answers as text,
  several separated by ``|``.

A file with ``correct_idx`` but no ``incorrect_idx`` is refused: in EAP-IG's later
greater-than files that column holds the year YY, not a token (rename it ``label``).
Every problem is one line naming the file, the row and the field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from circuits.errors import CircuitsError, short_repr
from circuits.tasks import (
    METRIC_NAMES,
    PAD,
    MetricFn,
    Task,
    _bos_prefix,
    _encode,
    _single_token,
    check_model_fits,
    make_task,
)

SUFFIXES = (".jsonl", ".csv")
JSONL_FIELDS = ("clean", "corrupted", "correct", "wrong", "answer_pos", "metric")


def is_task_file(task: str | Path) -> bool:
    """A path (not a task name): a ``Path``, or a string ending in .jsonl or .csv."""
    return isinstance(task, Path) or str(task).lower().endswith(SUFFIXES)


def task_name_of(task: str | Path | Task) -> str:
    """The name a task will have, known before any model is loaded (a file's: its stem)."""
    if isinstance(task, Task):
        return task.name
    if is_task_file(task):
        path = Path(task)
        if not path.is_file():
            raise CircuitsError(f"task file {path}: not found (expected a .jsonl or .csv file)")
        return path.stem
    return str(task)


def resolve_task(task: str | Path | Task, model, n_examples: int | None = None, seed: int = 0) -> Task:
    """A Task for ``model`` from a built-in name, a task file, or a Task (checked against the model)."""
    if isinstance(task, Task):
        check_model_fits(model, task)
        return task
    if is_task_file(task):
        return load_task_file(task, model, n_examples)
    return make_task(str(task), model, n_examples, seed)


# ---------------------------------------------------------------- reading rows


@dataclass(frozen=True)
class _Where:
    """Names the place of a problem: every message starts with the file and the row."""

    path: Path
    row: int

    def error(self, field: str | None, what: str) -> CircuitsError:
        at = f", field {field!r}" if field else ""
        return CircuitsError(f"{self.path}, row {self.row}{at}: {what}")


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[_Where, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = _Where(path, number)
        try:
            row = json.loads(line)
        except ValueError as err:
            raise where.error(None, f"not JSON ({err.args[0] if err.args else err})") from None
        if not isinstance(row, dict):
            raise where.error(None, f"expected a JSON object, got {type(row).__name__}")
        unknown = sorted(set(row) - set(JSONL_FIELDS))
        if unknown:
            raise where.error(unknown[0], f"unknown field; expected {', '.join(JSONL_FIELDS)}")
        yield where, row


def _csv_rows(path: Path, text: str) -> Iterator[tuple[_Where, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted cells may hold line breaks
    columns = set(reader.fieldnames or ())
    if not {"clean", "corrupted"} <= columns:
        raise CircuitsError(f"{path}: a task CSV needs the columns clean and corrupted, found "
                            f"{', '.join(sorted(c for c in columns if c)) or 'none'}")
    if "correct_idx" in columns and "incorrect_idx" not in columns:
        raise CircuitsError(f"{path}: column correct_idx without incorrect_idx: in EAP-IG's greater-than files "
                            "it holds the year YY, not a token; rename it label (greater-than) or add incorrect_idx (IOI)")
    if not columns & {"correct", "correct_idx", "label"}:
        raise CircuitsError(f"{path}: no answer column; expected correct_idx and incorrect_idx (EAP-IG IOI), "
                            "label (EAP-IG greater-than) or correct (text answers)")
    for number, row in enumerate(reader, start=1):
        yield _Where(path, number), _csv_row(_Where(path, number), row)


def _csv_row(where: _Where, row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row in the JSONL row's terms (EAP-IG's columns mapped onto ours)."""
    extra = row.get(None)  # type: ignore[call-overload]  # DictReader keys cells beyond the header by None
    if extra:
        raise where.error(None, f"{len(row) - 1 + len(extra)} cells, the header has {len(row) - 1} columns")
    out: dict[str, Any] = {"clean": row["clean"], "corrupted": row["corrupted"]}
    if "correct_idx" in row:
        out["correct"] = _integer(where, "correct_idx", row["correct_idx"])
        out["wrong"] = _integer(where, "incorrect_idx", row["incorrect_idx"])
    elif "label" in row:
        out["label"] = _integer(where, "label", row["label"])
    else:
        out["correct"] = row["correct"].split("|")
        if row.get("wrong"):
            out["wrong"] = row["wrong"].split("|")
    if row.get("answer_pos"):
        out["answer_pos"] = _integer(where, "answer_pos", row["answer_pos"])
    if row.get("metric"):
        out["metric"] = row["metric"]
    return out


def _integer(where: _Where, field: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise where.error(field, f"{value!r} is not an integer")


def _rows(path: Path) -> list[tuple[_Where, dict[str, Any]]]:
    if path.suffix.lower() not in SUFFIXES:
        raise CircuitsError(f"task file {path}: expected a .jsonl or .csv file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not a column name
    except FileNotFoundError:
        raise CircuitsError(f"task file {path}: not found (expected a .jsonl or .csv file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CircuitsError(f"task file {path}: unreadable ({err})") from None
    rows = list((_jsonl_rows if path.suffix.lower() == ".jsonl" else _csv_rows)(path, text))
    if not rows:
        raise CircuitsError(f"task file {path}: no rows")
    return rows


# ---------------------------------------------------------------- one example


@dataclass(frozen=True)
class _Example:
    clean: list[int]
    corrupted: list[int]
    positions: list[int]  # absolute, inside the row's own prompt
    correct: list[list[int]]  # per position: the correct tokens
    wrong: list[list[int]] | None
    prompt: str
    metric: str | None


class _Reader:
    """Turns rows into examples with one model's tokenizer and vocabulary."""

    def __init__(self, model) -> None:
        self.model = model
        self.tokenizer = getattr(model, "tokenizer", None)
        self.d_vocab = int(model.cfg.d_vocab)
        self.n_ctx = int(model.cfg.n_ctx)
        self.bos = _bos_prefix(model, self.tokenizer) if self.tokenizer is not None else []

    def _need_tokenizer(self, where: _Where, field: str) -> Any:
        if self.tokenizer is None:
            raise where.error(field, "text needs the model's tokenizer and this model has none; give token ids "
                                     "(a JSON list of integers) instead")
        return self.tokenizer

    def prompt(self, where: _Where, field: str, value: Any) -> list[int]:
        if isinstance(value, str):
            ids = self.bos + _encode(self._need_tokenizer(where, field), value)
        elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            ids = list(value)
        else:
            raise where.error(field, f"expected a text or a non-empty list of token ids, got {short_repr(value, 50)}")
        if not ids:
            raise where.error(field, "the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.d_vocab]
        if bad:
            raise where.error(field, f"token id {bad[0]} outside the model's vocabulary 0..{self.d_vocab - 1}")
        if len(ids) > self.n_ctx:
            raise where.error(field, f"{len(ids)} tokens, more than the model's context of {self.n_ctx}")
        return ids

    def answer(self, where: _Where, field: str, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            token = value
        elif isinstance(value, str) and value:
            one = _single_token(self._need_tokenizer(where, field), value)
            if one is None:
                n = len(_encode(self.tokenizer, value))
                raise where.error(field, f"answer {value!r} is {n} tokens for this tokenizer; an answer must be one "
                                         "token (mind the leading space)")
            token = one
        else:
            raise where.error(field, f"expected a token id or a one-token text, got {short_repr(value, 50)}")
        if not 0 <= token < self.d_vocab:
            raise where.error(field, f"token id {token} outside the model's vocabulary 0..{self.d_vocab - 1}")
        return token

    def answer_set(self, where: _Where, field: str, value: Any) -> list[int]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise where.error(field, "an empty list of answers")
        return [self.answer(where, field, item) for item in items]

    def year_tokens(self, where: _Where) -> list[int]:
        tokenizer = self._need_tokenizer(where, "label")
        tokens = [_single_token(tokenizer, f"{yy:02d}") for yy in range(100)]
        missing = [yy for yy, t in enumerate(tokens) if t is None]
        if missing:
            raise where.error("label", f"greater-than needs every two-digit year 00..99 to be one token; "
                                       f"{missing[0]:02d} is not, for this tokenizer")
        return [int(t) for t in tokens if t is not None]

    def example(self, where: _Where, row: dict[str, Any]) -> _Example:
        for field in ("clean", "corrupted"):
            if field not in row:
                raise where.error(field, "missing")
        clean = self.prompt(where, "clean", row["clean"])
        corrupted = self.prompt(where, "corrupted", row["corrupted"])
        if len(clean) != len(corrupted):
            raise where.error("corrupted", f"{len(corrupted)} tokens, the clean prompt {len(clean)}; clean and "
                                           "corrupted prompts must have the same length (aligned by position)")
        metric = row.get("metric")
        if metric is not None and not isinstance(metric, str):
            raise where.error("metric", f"expected a metric name, got {short_repr(metric, 50)}")
        if "label" in row:
            return self._greater_than(where, row["label"], clean, corrupted, row, metric)
        if "correct" not in row:
            raise where.error("correct", "missing (the correct answer: a token id or a one-token text)")
        positions, correct, wrong = self._answers(where, row, len(clean))
        return _Example(clean, corrupted, positions, correct, wrong, _text(row["clean"]), metric)

    def _answers(self, where: _Where, row: dict[str, Any], length: int
                 ) -> tuple[list[int], list[list[int]], list[list[int]] | None]:
        pos = row.get("answer_pos", -1)
        several = isinstance(pos, list)
        raw_positions = pos if several else [pos]
        if several:
            for field in ("correct", "wrong"):
                if field in row and (not isinstance(row[field], list) or len(row[field]) != len(pos)):
                    raise where.error(field, f"with answer_pos a list of {len(pos)} positions, expected a list of "
                                             f"{len(pos)} answers (one per position)")
        if not raw_positions:
            raise where.error("answer_pos", "an empty list of positions")
        positions = [self._position(where, p, length) for p in raw_positions]
        per_position = (lambda field: row[field]) if several else (lambda field: [row[field]])
        correct = [self.answer_set(where, "correct", v) for v in per_position("correct")]
        wrong = [self.answer_set(where, "wrong", v) for v in per_position("wrong")] if "wrong" in row else None
        return positions, correct, wrong

    def _position(self, where: _Where, pos: Any, length: int) -> int:
        pos = _integer(where, "answer_pos", pos)
        if not -length <= pos < length:
            raise where.error("answer_pos", f"{pos} is outside the prompt's {length} tokens (expected "
                                            f"{-length}..{length - 1}; negative counts from its end)")
        return pos % length

    def _greater_than(self, where: _Where, label: Any, clean: list[int], corrupted: list[int],
                      row: dict[str, Any], metric: str | None) -> _Example:
        yy = _integer(where, "label", label)
        if not 0 <= yy <= 98:
            raise where.error("label", f"{yy}: expected the start year's last two digits, 0..98 (a year above "
                                       "it must exist)")
        years = self.year_tokens(where)
        return _Example(clean, corrupted, [len(clean) - 1], [years[yy + 1:]], [years[: yy + 1]],
                        _text(row["clean"]), metric or "prob_diff")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


# ---------------------------------------------------------------- the task


def _metric_of(path: Path, examples: list[tuple[_Where, _Example]]) -> str:
    named = [(where, ex.metric) for where, ex in examples if ex.metric is not None]
    if not named:
        return "logit_diff"
    first = named[0][1]
    for where, metric in named:
        if metric != first:
            raise where.error("metric", f"{metric!r}, an earlier row names {first!r}; a file has one metric")
    return str(first)


def _padded(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=torch.long)


def _answer_tensor(sets: list[list[list[int]]], n_ans: int) -> torch.Tensor:
    """[n, n_ans] when every slot holds one token, else [n, n_ans, k] sets padded with PAD;
    missing slots are PAD throughout."""
    k = max(len(s) for slots in sets for s in slots)
    grid = [[(slots[j] if j < len(slots) else []) for j in range(n_ans)] for slots in sets]
    full = torch.tensor([[s + [PAD] * (k - len(s)) for s in slots] for slots in grid], dtype=torch.long)
    return full[..., 0] if k == 1 else full


def _pad_id(model) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    for name in ("pad_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int) and 0 <= token < int(model.cfg.d_vocab):
            return token
    return 0  # any token: no real position ever reads a pad (causal attention)


def load_task_file(path: str | Path, model, n_examples: int | None = None,
                   metric: str | MetricFn | None = None, name: str | None = None) -> Task:
    """The task in a JSONL or CSV file (module docstring) for ``model``: its first
    ``n_examples`` rows (all by default), ``metric`` replacing the file's, named ``name``
    (default: the file's stem)."""
    path = Path(path)
    rows = _rows(path)
    if n_examples is not None:
        if n_examples > len(rows):
            raise CircuitsError(f"task file {path}: {n_examples} examples asked for, the file has {len(rows)} rows")
        rows = rows[:n_examples]
    reader = _Reader(model)
    examples = [(where, reader.example(where, row)) for where, row in rows]
    chosen = metric if metric is not None else _metric_of(path, examples)
    if isinstance(chosen, str) and chosen not in METRIC_NAMES:
        from circuits.tasks import METRICS

        if chosen not in METRICS:
            raise CircuitsError(f"task file {path}: metric {chosen!r} unknown; expected {', '.join(METRIC_NAMES)} "
                                "or a name given to circuits.tasks.register_metric")
    task = _task_from(path, examples, chosen, name or path.stem, _pad_id(model))
    check_model_fits(model, task)
    return task


def _task_from(path: Path, rows: list[tuple[_Where, _Example]], metric: str | MetricFn, name: str,
               pad_id: int) -> Task:
    """Rows right-padded to the longest with ``pad_id``, answers padded with PAD."""
    examples = [ex for _, ex in rows]
    lengths = [len(ex.clean) for ex in examples]
    width = max(lengths)
    n_ans = max(len(ex.positions) for ex in examples)
    has_wrong = [ex.wrong is not None for ex in examples]
    if any(has_wrong) and not all(has_wrong):
        where = rows[has_wrong.index(not has_wrong[0])][0]
        said = "gives some" if has_wrong[0] else "gives none"
        raise where.error("wrong", f"{'missing' if has_wrong[0] else 'given'}, while an earlier row {said}; give "
                                   "wrong answers in every row or in none")
    # A padded slot reads the row's first answer position (masked): no extra position to unembed.
    positions = torch.tensor([ex.positions + ex.positions[:1] * (n_ans - len(ex.positions)) for ex in examples])
    correct = _answer_tensor([ex.correct for ex in examples], n_ans)
    wrong = _answer_tensor([ex.wrong for ex in examples if ex.wrong is not None], n_ans) if all(has_wrong) else None
    return Task(name, _padded([ex.clean for ex in examples], width, pad_id),
                _padded([ex.corrupted for ex in examples], width, pad_id), positions, correct, wrong, metric,
                tuple(ex.prompt for ex in examples),
                {"file": str(path), "pad_id": pad_id},
                torch.tensor(lengths, dtype=torch.long) if min(lengths) < width else None)
