"""A study on disk: one HDF5 shard per step, an index stacking them, and the ``Study`` read API.

Layout (documented for h5py-only readers in ``docs/storage.md``)::

    STUDY/study.json                 provenance of the sweep + the task's prompts
    STUDY/index.h5                   virtual datasets stacking every complete shard over steps
    STUDY/shards/step00000600.h5     one per step, complete by construction

A shard is written under a temporary name (``.step00000600.h5.tmp-PID``), flushed, marked
complete (the root attribute ``complete``) as its very last write, closed and renamed into
place, so a file named ``stepNNNNNNNN.h5`` is complete unless damaged afterwards. Readers
still check the mark and never read a shard without it. Every write runs on one background
thread (``BackgroundWriter``) so that writing batch N overlaps the forward pass of batch N+1.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import queue
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from circuits import chunks
from circuits.errors import CircuitsError, first_line

# /2: attention patterns stored as their lower triangle (format /1 held the full square).
SHARD_FORMAT = "circuits-shard/2"
STUDY_FORMAT = "circuits-study/2"
INDEX_FORMAT = "circuits-index/2"
STUDY_FILE = "study.json"
INDEX_FILE = "index.h5"
SHARD_DIR = "shards"
SHARD_RE = re.compile(r"^step(\d{8})\.h5$")
TMP_RE = re.compile(r"^\.(step\d{8}\.h5|index\.h5)\.tmp-(\d+)$")
# Groups the sweep itself writes; analyses may not use these names.
RESERVED = ("patterns", "activations", "outputs", "task")
PATTERNS = "patterns"  # [example, layer, head, q*(q+1)/2 + k]: the causal lower triangle, row by row
PATTERN_LAYOUT = "lower triangle of [query, key] row by row: [q, k] (k <= q) at q*(q+1)/2 + k; [q, k > q] is 0"
OUTPUT_KEYS = ("logits_clean", "logits_corrupted", "metric_clean", "metric_corrupted", "loss_clean", "loss_corrupted")

# Measured in docs/performance.md (float16 patterns + residuals + head outputs, 64 x 128
# tokens, 2-layer d128): byte shuffle then zstd-1 stores patterns (their triangles) at ~0.22
# of raw float32 squares and activations at ~0.42 (float16 mantissas are nearly random),
# ~0.29 overall, at a fraction of gzip's CPU. Chunks are compressed by circuits.chunks (in
# parallel, off HDF5's pipeline) into that standard pipeline's format: every reader needs
# only ``import hdf5plugin``.
COMPRESSION_NAME = chunks.PIPELINE_NAME
PATTERN_CHUNK_BYTES = 64 * 1024
ACTIVATION_CHUNK_BYTES = 256 * 1024


# ---------------------------------------------------------------- fault points (tests only)
# ``CIRCUITS_FAULT="POINT[@N]:ACTION"`` (comma-separated for several) stops the writer at the
# N-th time (default 1st) it reaches POINT in this process. Points: ``batch`` (a batch half
# written into a temporary shard), ``finish`` (shard flushed, completion mark not yet set),
# ``landed`` (shard renamed into place, index not yet rebuilt), ``index`` (temporary index
# half written). Actions: ``pause`` prints ``circuits-fault: POINT@N`` to stderr and sleeps
# (a test kills the process there), ``enospc`` raises OSError(ENOSPC) (a full disk). Inert
# unless the variable is set; used by tests/test_reliability_*.py (docs/reliability.md).
FAULT_ENV = "CIRCUITS_FAULT"
_fault_hits: dict[str, int] = {}


def _fault(point: str, path: Path) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _fault_hits[point] = hit = _fault_hits.get(point, 0) + 1
    for item in spec.split(","):
        where, _, action = item.strip().partition(":")
        name, _, nth = where.partition("@")
        if name != point or hit != int(nth or 1):
            continue
        if action == "pause":
            print(f"circuits-fault: {point}@{hit}", file=sys.stderr, flush=True)
            time.sleep(600)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def shard_name(step: int) -> str:
    return f"step{step:08d}.h5"


# ---------------------------------------------------------------- patterns: the causal lower triangle
# A causal pattern is 0 above its diagonal. Storing only the triangle halves what is
# compressed, and zstd runs ~4x faster on it than on rows cut by runs of zeros (measured in
# docs/performance.md), for slightly fewer bytes.


def triangle_size(n_positions: int) -> int:
    return n_positions * (n_positions + 1) // 2


def positions_of(triangle: int) -> int:
    """The n with ``triangle_size(n) == triangle`` (ValueError if there is none)."""
    n = int((np.sqrt(8 * triangle + 1) - 1) / 2)
    if triangle_size(n) != triangle:
        raise ValueError(f"{triangle} is not the size of a lower triangle")
    return n


@functools.lru_cache(maxsize=8)
def lower_triangle(n_positions: int) -> np.ndarray:
    """Flat indices ``q * n + k`` (k <= q) of a [query, key] square, in stored order."""
    q, k = np.tril_indices(n_positions)
    index = q * n_positions + k
    index.flags.writeable = False
    return index


def pack_patterns(square: np.ndarray) -> np.ndarray:
    """[..., q, k] -> [..., q*(q+1)/2] as stored (the sweep does the same with torch)."""
    n = square.shape[-1]
    return square.reshape(*square.shape[:-2], n * n)[..., lower_triangle(n)]


def unpack_patterns(packed: np.ndarray) -> np.ndarray:
    """[..., q*(q+1)/2] as stored -> [..., q, k], zeros above the diagonal."""
    n = positions_of(packed.shape[-1])
    square = np.zeros((*packed.shape[:-1], n * n), dtype=packed.dtype)
    square[..., lower_triangle(n)] = packed
    return square.reshape(*packed.shape[:-1], n, n)


def _describe_patterns(dataset: h5py.Dataset) -> None:
    """What an h5py-only reader needs to unpack a patterns dataset (shard or index)."""
    dataset.attrs["layout"] = PATTERN_LAYOUT
    dataset.attrs["positions"] = positions_of(dataset.shape[-1])


def _utf8(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------- writing


class BackgroundWriter:
    """One thread running submitted writes in order; a bounded queue keeps memory to ~depth batches.

    An exception on the thread is re-raised in the caller at the next ``submit`` or ``wait``;
    later jobs are skipped (the shard they belong to is then never marked complete).
    """

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="circuits-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, args = item
                if self._error is None:
                    try:
                        fn(*args)
                    except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                        self._error = err
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn: Callable, *args: Any) -> None:
        self._raise()
        self._queue.put((fn, args))

    def wait(self) -> None:
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Finish queued work (errors dropped: call ``wait`` first to see them) and stop."""
        self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _divisor_at_most(n: int, target: int) -> int:
    """Largest divisor of ``n`` that is <= target (>= 1): chunks never straddle two batches."""
    for d in range(max(1, min(n, target)), 0, -1):
        if n % d == 0:
            return d
    return 1


class ShardWriter:
    """Writes one step's shard through a BackgroundWriter; ``finish`` lands it atomically.

    All h5py calls run on the writer thread. Datasets are created on their first batch
    (shapes come from the model's outputs) with chunks that never straddle two batches.
    """

    def __init__(self, final: Path, n_examples: int, batch_size: int, writer: BackgroundWriter) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.writer = writer
        self._file: h5py.File | None = None
        self._failed = False  # set by any failed job: the shard then never lands
        writer.submit(self._guarded, self._open)

    def _guarded(self, job: Callable, *args: Any) -> None:
        """Run one job on the writer thread; after a failure, later jobs of this shard do nothing.

        The writer hands an error to the caller once; jobs of this shard queued before the
        caller saw it (its ``finish`` included) must not complete a shard missing rows.
        """
        if self._failed:
            return
        try:
            job(*args)
        except OSError as err:  # a full disk, a vanished folder: name the file and the cause
            self._drop()
            reason = (err.strerror or _first_line(err)).lower()
            raise CircuitsError(f"{self.final}: cannot write this shard ({reason}); earlier shards are intact, "
                                "free space or fix the folder and re-run the sweep to redo this step") from None
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        """After a failed job (on the writer thread): close and remove the temporary file now,
        since the caller may see the error only outside this shard's own cleanup."""
        self._failed = True
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - the original error is being raised
                pass
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        self._file = h5py.File(self.tmp, "w")

    def _dataset(self, name: str, array: np.ndarray) -> h5py.Dataset:
        f = self._file
        if name in f:
            return f[name]
        shape = (self.n_examples, *array.shape[1:])
        per_example = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
        if name == PATTERNS:  # one (example-group, layer, head) per chunk: one head reads fast
            per_chunk = per_example // (array.shape[1] * array.shape[2])
            rows = _divisor_at_most(self.batch_size, max(1, PATTERN_CHUNK_BYTES // max(per_chunk, 1)))
            chunk_shape = (min(rows, shape[0]), 1, 1, *array.shape[3:])
        else:
            rows = _divisor_at_most(self.batch_size, max(1, ACTIVATION_CHUNK_BYTES // per_example))
            chunk_shape = (min(rows, shape[0]), *array.shape[1:])
        dataset = f.create_dataset(name, shape=shape, dtype=array.dtype, chunks=chunk_shape, **chunks.PIPELINE)
        if name == PATTERNS:
            _describe_patterns(dataset)
        return dataset

    def write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue ``arrays`` (each [batch, ...]) into rows ``start:start+batch`` of their datasets."""
        self.writer.submit(self._guarded, self._write_batch, start, arrays)

    def _write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for i, (name, array) in enumerate(arrays.items()):
            chunks.write_rows(self._dataset(name, array), start, array)
            if i == 0:
                _fault("batch", self.tmp)

    def write_static(self, arrays: dict[str, Any]) -> None:
        """Queue whole datasets (task prompts, analysis results): small, stored uncompressed."""
        self.writer.submit(self._guarded, self._write_static, arrays)

    def _write_static(self, arrays: dict[str, Any]) -> None:
        for name, value in arrays.items():
            array = np.asarray(value)
            # Fletcher-32 (HDF5's own checksum filter): a damaged value is a read error, not a
            # wrong number. It needs chunked storage, which a 0-d or empty dataset cannot have.
            checked = {"fletcher32": True} if array.ndim and array.size else {}
            self._file.create_dataset(name, data=array, **checked)

    def finish(self, provenance: dict[str, Any], then: Callable[[], None] | None = None) -> None:
        """Queue: provenance, flush, completion mark (last write), close, rename; then ``then``."""
        self.writer.submit(self._guarded, self._finish, provenance, then)

    def _finish(self, provenance: dict[str, Any], then: Callable[[], None] | None) -> None:
        f = self._file
        f.attrs["format"] = SHARD_FORMAT
        f.attrs["step"] = int(provenance["step"])
        f.attrs["tokens_seen"] = int(provenance["tokens_seen"])
        f.attrs["provenance"] = _utf8(provenance)
        f.flush()
        _fault("finish", self.tmp)
        f.attrs["complete"] = True
        f.flush()
        f.close()
        self._file = None
        os.replace(self.tmp, self.final)
        _fault("landed", self.final)
        if then is not None:
            then()

    def abort(self) -> None:
        """Drop the temporary file (the writer thread may have failed: do it here, after waiting)."""
        try:
            self.writer.wait()
        except BaseException:  # noqa: BLE001 - the original error is being raised already
            pass
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001
                pass
            self._file = None
        self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- shard inspection


def _walk(f: h5py.File) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every dataset of a shard: path -> (shape, dtype)."""
    found: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = (tuple(obj.shape), obj.dtype)

    try:
        f.visititems(visit)
    except (RuntimeError, OSError, ValueError, KeyError) as err:  # damaged metadata
        raise CircuitsError(f"{f.filename}: corrupted shard, cannot list its datasets ({_first_line(err)})") from None
    return found


def _attr(f: h5py.File, name: str) -> Any:
    """A root attribute as a plain Python scalar (None when missing or not a scalar)."""
    try:
        value = f.attrs.get(name)
    except (OSError, TypeError, ValueError, RuntimeError, KeyError):  # an attribute h5py cannot decode
        return None
    if isinstance(value, np.ndarray):
        if value.shape != ():
            return None
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _format_error(path: Path, what: str, found: Any, expected: str) -> str:
    if isinstance(found, str) and found.split("/")[0] == expected.split("/")[0]:
        return (f"{path}: a {what} of another circuits version (format {found!r}, this version reads {expected!r}); "
                "sweep again into a new folder")
    return f"{path}: not a circuits {what} (format {found!r}, expected {expected!r})"


def check_shard(f: h5py.File, path: Path, step: int | None = None, prompt_hash: str | None = None) -> None:
    """Refuse a shard without its completion mark, of another format, with damaged attributes,
    or (given the study's ``prompt_hash``) of another study.

    Attributes are read as plain values (nothing is unpickled); ``step`` is the one its file name says.
    """
    if _attr(f, "complete") is not True:
        raise CircuitsError(f"{path}: incomplete shard (no completion mark); re-run the sweep to redo it")
    if _attr(f, "format") != SHARD_FORMAT:
        raise CircuitsError(_format_error(path, "shard", _attr(f, "format"), SHARD_FORMAT))
    for name in ("step", "tokens_seen"):
        value = _attr(f, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CircuitsError(f"{path}: damaged shard, attribute {name!r} is {value!r}, expected an integer")
    if step is not None and _attr(f, "step") != step:
        raise CircuitsError(f"{path}: holds step {_attr(f, 'step')}, not the step {step} its name says "
                            "(a shard renamed or copied by hand); move it away and re-run the sweep")
    try:
        provenance = json.loads(_attr(f, "provenance"))
    except (TypeError, ValueError):
        provenance = None
    if not isinstance(provenance, dict):
        raise CircuitsError(f"{path}: damaged shard, attribute 'provenance' is not a JSON object")
    for name in ("step", "tokens_seen"):  # written twice: attribute and provenance must agree
        if provenance.get(name) != _attr(f, name):
            raise CircuitsError(f"{path}: damaged shard, {name} {_attr(f, name)} disagrees with its provenance "
                                f"({provenance.get(name)!r})")
    theirs = provenance.get("task")
    theirs = theirs.get("prompt_hash") if isinstance(theirs, dict) else None
    if prompt_hash is not None and theirs is not None and theirs != prompt_hash:
        raise CircuitsError(f"{path}: a shard of another study (prompt hash {theirs!r}, this study's "
                            f"{prompt_hash!r}); move it away and re-run the sweep")


def open_shard(path: Path, prompt_hash: str | None = None) -> h5py.File:
    """Open a landed shard read-only, refusing damaged or unmarked files (and, given the study's
    ``prompt_hash``, a shard of another study) with one clear line."""
    try:
        f = h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as err:
        raise CircuitsError(f"{path}: corrupted or truncated shard, cannot be opened ({_first_line(err)})") from None
    m = SHARD_RE.match(Path(path).name)
    try:
        check_shard(f, path, int(m.group(1)) if m else None, prompt_hash)
    except CircuitsError:
        f.close()
        raise
    return f


def _max_open(wanted: int) -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return min(wanted, 64)
    return max(8, min(wanted, soft // 4)) if soft > 0 else wanted


def _signature(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _first_line(err: BaseException) -> str:
    return first_line(err, 160)


def scan_shards(study: Path) -> dict[int, Path]:
    """Step -> path of every file named like a landed shard (temporary files are ignored)."""
    folder = Path(study) / SHARD_DIR
    if not folder.is_dir():
        return {}
    found = {}
    for entry in os.scandir(folder):
        m = SHARD_RE.match(entry.name)
        if m and entry.is_file():
            found[int(m.group(1))] = Path(entry.path)
    return dict(sorted(found.items()))


def clean_stale_temporaries(study: Path) -> list[Path]:
    """Remove temporary files left by killed writers (their process is gone)."""
    removed = []
    for folder in (Path(study), Path(study) / SHARD_DIR):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            m = TMP_RE.match(entry.name)
            if m and not _pid_alive(int(m.group(2))):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier, aborted sweep in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the index


def _fill_value(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind == "i":
        return -1
    return 0


def write_index(study: Path, layouts: dict[int, dict[str, tuple[tuple[int, ...], np.dtype]]],
                steps_meta: dict[int, int], provenance: dict[str, Any]) -> Path:
    """(Re)write ``index.h5`` atomically: one virtual dataset per shard dataset, steps stacked.

    ``layouts`` maps step -> that shard's datasets (path -> shape, dtype). A step whose shard
    lacks a dataset, or holds it with another shape, reads as the fill value there (NaN for
    floats, False for booleans, -1 for integers).
    """
    study = Path(study)
    steps = sorted(layouts)
    final = study / INDEX_FILE
    tmp = study / f".{INDEX_FILE}.tmp-{os.getpid()}"
    keys: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for step in steps:
        for name, spec in layouts[step].items():
            keys.setdefault(name, spec)
    try:
        _write_index_file(tmp, steps, keys, layouts, steps_meta, provenance)
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = (err.strerror or _first_line(err)).lower()
        raise CircuitsError(f"{final}: cannot write the index ({reason}); the shards are intact, "
                            "re-run the sweep to rebuild it") from None
    return final


def _write_index_file(tmp: Path, steps: list[int], keys: dict, layouts: dict, steps_meta: dict[int, int],
                      provenance: dict[str, Any]) -> None:
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = INDEX_FORMAT
        f.attrs["provenance"] = _utf8(provenance)
        f.create_dataset("steps", data=np.asarray(steps, dtype=np.int64))
        f.create_dataset("tokens_seen", data=np.asarray([steps_meta.get(s, -1) for s in steps], dtype=np.int64))
        for name, (shape, dtype) in sorted(keys.items()):
            layout = h5py.VirtualLayout(shape=(len(steps), *shape), dtype=dtype)
            for i, step in enumerate(steps):
                if layouts[step].get(name, (None,))[0] == shape:
                    source = f"{SHARD_DIR}/{shard_name(step)}"  # relative: resolved next to index.h5
                    layout[i] = h5py.VirtualSource(source, name, shape=shape, dtype=dtype)
            dataset = f.create_virtual_dataset(name, layout, fillvalue=_fill_value(np.dtype(dtype)))
            if name == PATTERNS:
                _describe_patterns(dataset)
        _fault("index", tmp)
        f.flush()


# ---------------------------------------------------------------- study.json


def read_study_json(study: Path) -> dict[str, Any] | None:
    path = Path(study) / STUDY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
        raise CircuitsError(f"{path}: unreadable study description ({_first_line(err)})") from None
    if not isinstance(data, dict) or data.get("format") != STUDY_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CircuitsError(_format_error(path, "study", found, STUDY_FORMAT))
    _check_record(data, path)
    return data


# Fields of study.json the read API relies on: (path, type, must be positive).
_RECORD_FIELDS = (
    ("manifest", str, False), ("dtype", str, False), ("hooks", list, False),
    ("task.name", str, False), ("task.prompt_hash", str, False), ("task.n_examples", int, True),
    ("task.seq_len", int, True), ("task.arrays", dict, False), ("task.arrays.clean", list, False),
    ("task.arrays.corrupted", list, False), ("model.n_layers", int, True), ("model.n_heads", int, True),
)


def _check_record(data: dict[str, Any], path: Path) -> None:
    for field, kind, positive in _RECORD_FIELDS:
        value: Any = data
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (positive and value < 1):
            raise CircuitsError(f"{path}: damaged study description, field {field!r} is {_short_repr(value)}, "
                                f"expected {'a positive ' if positive else 'a '}{kind.__name__}")
    if not all(isinstance(h, str) for h in data["hooks"]):
        raise CircuitsError(f"{path}: damaged study description, field 'hooks' must list hook names")


def _short_repr(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def write_study_json(study: Path, data: dict[str, Any]) -> None:
    path = Path(study) / STUDY_FILE
    tmp = path.with_name(f".{STUDY_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def task_arrays(task) -> dict[str, np.ndarray]:
    """The task's tensors as int64 arrays, named as stored (``task/...``)."""
    out = {}
    for name in ("clean", "corrupted", "answer_pos", "correct", "wrong"):
        tensor = getattr(task, name)
        if tensor is not None:
            out[name] = tensor.detach().cpu().to(dtype=__import__("torch").int64).numpy()
    return out


def task_from_record(record: dict[str, Any]):
    """Rebuild the Task stored in study.json (prompts, answers, metric, options)."""
    import torch

    from circuits.tasks import Task

    arrays = {k: torch.tensor(np.asarray(v, dtype=np.int64)) for k, v in record["arrays"].items()}
    return Task(record["name"], arrays["clean"], arrays["corrupted"], arrays["answer_pos"], arrays["correct"],
                arrays.get("wrong"), record.get("metric", "logit_diff"), tuple(record.get("prompts", ())),
                dict(record.get("options", {})))


# ---------------------------------------------------------------- reading


class Study:
    """A study as arrays: patterns, activations, outputs and analysis results by step.

    Only complete shards are ever read; ``refresh()`` picks up shards landed since opening
    (a study still being written reads as far as it goes). Step-wise reads go to the shard
    files (kept open, least recently used closed first); ``index.h5`` serves h5py users.
    """

    # Shards kept open: enough for every step of a Pythia schedule (154), so reading a key
    # over all steps does not reopen files; bounded by the process's file-descriptor limit.
    MAX_OPEN = 512

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        record = read_study_json(self.path)
        if record is None:
            hint = " (the folder does not exist)" if not self.path.exists() else ""
            raise CircuitsError(f"{self.path}: not a study, no {STUDY_FILE}{hint}; make one with `circuits sweep`")
        self._record = record
        self._task = None
        self._manifest = None
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self._max_open = _max_open(self.MAX_OPEN)  # the file-descriptor limit, read once
        self._layouts: dict[int, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
        self._paths: dict[int, Path] = {}
        self._signatures: dict[int, tuple[int, int, int]] = {}
        self.problems: dict[int, str] = {}
        self.steps: list[int] = []
        self.refresh()

    # -- lifecycle
    def refresh(self) -> Study:
        """Rescan the shards folder: new complete shards become steps; damaged ones problems."""
        found = scan_shards(self.path)
        for step in list(self._layouts):
            if step not in found:
                self._forget(step)
        for step in list(self.problems):
            if step not in found:
                del self.problems[step]
        for step, path in found.items():
            signature = _signature(path)
            if step in self._layouts or (step in self.problems and self._signatures.get(step) == signature):
                continue  # landed shards never change; a damaged file is re-checked once replaced
            self._paths[step] = path
            self._signatures[step] = signature
            try:
                f = self._handle(step)
                layout = _walk(f)
                self._check_layout(step, layout)
                self._layouts[step] = layout
                self.problems.pop(step, None)
            except CircuitsError as err:
                self._forget(step)
                self.problems[step] = str(err)
        self.steps = sorted(self._layouts)
        return self

    def _check_layout(self, step: int, layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Refuse a shard whose datasets cannot be what this study stored."""
        path, task = self._paths[step], self._record["task"]
        n, t = task["n_examples"], task["seq_len"]
        patterns = (n, self.n_layers, self.n_heads, triangle_size(t))
        for name, (shape, dtype) in layout.items():
            kind = np.dtype(dtype).kind
            if kind not in "biuf":
                raise CircuitsError(f"{path}: damaged shard, {name!r} holds {dtype}, expected numbers")
            wrong = (name == PATTERNS and (shape != patterns or kind != "f")) or (
                name.startswith(("outputs/", "activations/")) and (shape[:1] != (n,) or kind != "f"))
            if wrong:
                want = f"float {patterns}" if name == PATTERNS else f"float [{n}, ...]"
                raise CircuitsError(f"{path}: damaged shard, {name!r} is {dtype} {shape}, expected {want}")

    def _forget(self, step: int) -> None:
        f = self._open.pop(step, None)
        if f is not None:
            f.close()
        self._layouts.pop(step, None)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> Study:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Study({str(self.path)!r}, {len(self.steps)} steps, task={self._record['task']['name']!r})"

    def _handle(self, step: int) -> h5py.File:
        f = self._open.get(step)
        if f is not None:
            self._open.move_to_end(step)
            return f
        f = open_shard(self._paths[step], self._record["task"]["prompt_hash"])
        self._open[step] = f
        while len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return f

    def _shard(self, step: int) -> h5py.File:
        step = int(step)
        if step in self.problems:
            raise CircuitsError(self.problems[step])
        if step not in self._layouts:
            span = f"{len(self.steps)} steps from {self.steps[0]} to {self.steps[-1]}" if self.steps else "no complete step yet"
            raise CircuitsError(f"study {self.path}: step {step} is not in the study ({span})")
        return self._handle(step)

    def _read(self, step: int, name: str, index: Any = ()) -> np.ndarray:
        f = self._shard(step)
        if name not in f:
            raise CircuitsError(f"study {self.path}: step {step} holds no {name!r}")
        try:
            return f[name][index]
        except (OSError, ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
            raise CircuitsError(f"{self._paths[step]}: corrupted shard, cannot read {name!r} ({_first_line(err)})") from None

    # -- description
    @property
    def provenance(self) -> dict[str, Any]:
        """What made the study (manifest, task and prompt hash, versions, hooks, dtype, options)."""
        return {k: v for k, v in self._record.items() if k != "task"} | {
            "task": {k: v for k, v in self._record["task"].items() if k != "arrays"}
        }

    def shard_provenance(self, step: int) -> dict[str, Any]:
        return json.loads(self._shard(step).attrs["provenance"])

    @property
    def manifest(self):
        if self._manifest is None:
            import yaml

            from circuits.manifest import parse_manifest

            origin = self._record.get("manifest_origin") or f"{self.path}/{STUDY_FILE}#manifest"
            try:
                data = yaml.safe_load(self._record["manifest"])
            except yaml.YAMLError:
                raise CircuitsError(f"{self.path / STUDY_FILE}: damaged study description, field 'manifest' "
                                    "is not valid YAML") from None
            self._manifest = parse_manifest(data, origin=str(origin))
        return self._manifest

    @property
    def task(self):
        if self._task is None:
            try:
                task = task_from_record(self._record["task"])
                if task.prompt_hash() != self._record["task"]["prompt_hash"]:
                    raise CircuitsError("its prompts do not match their recorded hash")
                self._task = task
            except CircuitsError as err:
                raise CircuitsError(f"{self.path / STUDY_FILE}: damaged study description ({err})") from None
            except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RuntimeError) as err:
                raise CircuitsError(f"{self.path / STUDY_FILE}: damaged study description, field 'task' does "
                                    f"not describe a task ({_first_line(err)})") from None
        return self._task

    @property
    def n_layers(self) -> int:
        return int(self._record["model"]["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self._record["model"]["n_heads"])

    @property
    def n_examples(self) -> int:
        return int(self._record["task"]["n_examples"])

    @property
    def seq_len(self) -> int:
        return int(self._record["task"]["seq_len"])

    @property
    def hooks(self) -> list[str]:
        return list(self._record["hooks"])

    @property
    def tokens_seen(self) -> np.ndarray:
        return np.asarray([int(self._shard(s).attrs["tokens_seen"]) for s in self.steps], dtype=np.int64)

    def tokens(self, example: int, corrupted: bool = False) -> np.ndarray:
        """Token ids of one prompt (clean, or its corrupted twin)."""
        self._check_index("example", example, self.n_examples)
        prompts = self.task.corrupted if corrupted else self.task.clean  # checked against the prompt hash
        return prompts[int(example)].numpy().astype(np.int64)

    # -- step-wise reads
    def _check_index(self, what: str, value: int, size: int) -> None:
        if not isinstance(value, int | np.integer) or not 0 <= int(value) < size:
            raise CircuitsError(f"study {self.path}: {what} {value!r} does not exist (valid: 0..{size - 1})")

    def pattern(self, step: int, layer: int, head: int, example: int) -> np.ndarray:
        """Attention pattern [query, key] (float32) of one head on one clean prompt at one step."""
        self._check_index("layer", layer, self.n_layers)
        self._check_index("head", head, self.n_heads)
        self._check_index("example", example, self.n_examples)
        return unpack_patterns(self._read(step, PATTERNS, (int(example), int(layer), int(head))).astype(np.float32))

    def activation(self, step: int, hook: str, example: int | None = None) -> np.ndarray:
        """A cached activation of the clean prompts ([example, ...] as TL shapes it), float32."""
        if hook not in self.hooks:
            shown = ", ".join(self.hooks[:6]) or "none"
            raise CircuitsError(f"study {self.path}: hook {hook!r} was not cached (cached: {shown})")
        index: Any = ()
        if example is not None:
            self._check_index("example", example, self.n_examples)
            index = int(example)
        return self._read(step, f"activations/{hook}", index).astype(np.float32)

    def array_at(self, step: int, key: str) -> np.ndarray:
        """One stored array at one step (``"heads/induction"``, ``"outputs/metric_clean"``...)."""
        return self._read(step, key.strip("/"))

    def has(self, key: str) -> bool:
        key = key.strip("/")
        return any(key in layout for layout in self._layouts.values())

    def keys(self, prefix: str | None = None) -> list[str]:
        """Every stored key (datasets), optionally only those under ``prefix/``."""
        found = sorted({k for layout in self._layouts.values() for k in layout})
        if prefix:
            found = [k for k in found if k.startswith(prefix.strip("/") + "/")]
        return found

    def array(self, key: str) -> np.ndarray:
        """``key`` stacked over ``steps``: [n_steps, ...]; NaN (False, -1) where a step lacks it."""
        key = key.strip("/")
        specs = [self._layouts[s][key] for s in self.steps if key in self._layouts[s]]
        if not specs:
            raise CircuitsError(f"study {self.path}: no step holds {key!r} (stored: {', '.join(self.keys()[:8])})")
        shape, dtype = specs[-1]
        out = np.full((len(self.steps), *shape), _fill_value(np.dtype(dtype)), dtype=dtype)
        for i, step in enumerate(self.steps):
            if self._layouts[step].get(key, (None,))[0] == shape:
                out[i] = self._read(step, key)
        return out

    def _mean(self, key: str, per_example: bool) -> np.ndarray:
        values = self.array(f"outputs/{key}").astype(np.float64)
        return values if per_example else values.mean(axis=tuple(range(1, values.ndim)))

    def metric(self, per_example: bool = False) -> np.ndarray:
        """Task metric on the clean prompts over steps (mean over examples unless per_example)."""
        return self._mean("metric_clean", per_example)

    def metric_corrupted(self, per_example: bool = False) -> np.ndarray:
        return self._mean("metric_corrupted", per_example)

    def loss(self, per_example: bool = False) -> np.ndarray:
        """Cross-entropy of the correct answers at the answer positions (clean prompts), over steps."""
        return self._mean("loss_clean", per_example)

    def loss_corrupted(self, per_example: bool = False) -> np.ndarray:
        return self._mean("loss_corrupted", per_example)

    def circuit(self, step: int, **kwargs: Any):
        """The circuit found at ``step`` as a networkx DiGraph (see circuits.graph)."""
        from circuits.graph import circuit_digraph

        return circuit_digraph(self, step, **kwargs)


def open_study(path: str | Path) -> Study:
    """Open a study folder made by ``circuits sweep`` (readable while a sweep still writes it)."""
    return Study(path)


def shard_layouts(paths: Iterable[tuple[int, Path]]) -> tuple[dict, dict, dict[int, str]]:
    """(layouts, tokens_seen, problems) of landed shards, for building the index."""
    layouts, tokens, problems = {}, {}, {}
    for step, path in paths:
        try:
            with open_shard(path) as f:
                layouts[step] = _walk(f)
                tokens[step] = int(f.attrs.get("tokens_seen", -1))
        except CircuitsError as err:
            problems[step] = str(err)
    return layouts, tokens, problems
