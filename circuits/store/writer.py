"""Writing a shard: one background thread for every h5py call, and an atomic landing.

A shard is written under a temporary name (``.step00000600.h5.tmp-PID``), flushed, marked
complete (the root attribute ``complete``) as its very last write, closed and renamed into
place, so a file named ``stepNNNNNNNN.h5`` is complete unless damaged afterwards. Every write
runs on one thread (``BackgroundWriter``) so that writing batch N overlaps the forward pass of
batch N+1.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from circuits import chunks
from circuits.errors import CircuitsError
from circuits.faults import fault
from circuits.store.format import (
    ACTIVATION_CHUNK_BYTES,
    PATTERN_CHUNK_BYTES,
    PATTERNS,
    SHARD_FORMAT,
    cause,
    describe_patterns,
    json_text,
)


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
        """Queue ``fn(*args)`` (blocks while the queue is full); raises an earlier job's error."""
        self._raise()
        self._queue.put((fn, args))

    def wait(self) -> None:
        """Return once every queued job has run; raises the error of a failed one."""
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
            reason = (err.strerror or cause(err)).lower()
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

    @property
    def _open_file(self) -> h5py.File:
        """The temporary file, for jobs queued after ``_open``; a job after ``_finish`` or
        ``_drop`` is a bug in this class, reported as such rather than as a ``None`` attribute."""
        if self._file is None:
            raise RuntimeError(f"{self.tmp}: shard file is not open (a write queued after finish or abort)")
        return self._file

    def _dataset(self, name: str, array: np.ndarray) -> h5py.Dataset:
        f = self._open_file
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
            describe_patterns(dataset)
        return dataset

    def write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue ``arrays`` (each [batch, ...]) into rows ``start:start+batch`` of their datasets."""
        self.writer.submit(self._guarded, self._write_batch, start, arrays)

    def _write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for i, (name, array) in enumerate(arrays.items()):
            chunks.write_rows(self._dataset(name, array), start, array)
            if i == 0:
                fault("batch", self.tmp)

    def write_static(self, arrays: dict[str, Any]) -> None:
        """Queue whole datasets (task prompts, analysis results): small, stored uncompressed."""
        self.writer.submit(self._guarded, self._write_static, arrays)

    def _write_static(self, arrays: dict[str, Any]) -> None:
        for name, value in arrays.items():
            array = np.asarray(value)
            # Fletcher-32 (HDF5's own checksum filter): a damaged value is a read error, not a
            # wrong number. It needs chunked storage, which a 0-d or empty dataset cannot have.
            checked = {"fletcher32": True} if array.ndim and array.size else {}
            self._open_file.create_dataset(name, data=array, **checked)

    def finish(self, provenance: dict[str, Any], then: Callable[[], None] | None = None) -> None:
        """Queue: provenance, flush, completion mark (last write), close, rename; then ``then``."""
        self.writer.submit(self._guarded, self._finish, provenance, then)

    def _finish(self, provenance: dict[str, Any], then: Callable[[], None] | None) -> None:
        f = self._open_file
        f.attrs["format"] = SHARD_FORMAT
        f.attrs["step"] = int(provenance["step"])
        f.attrs["tokens_seen"] = int(provenance["tokens_seen"])
        f.attrs["provenance"] = json_text(provenance)
        f.flush()
        fault("finish", self.tmp)
        f.attrs["complete"] = True
        f.flush()
        f.close()
        self._file = None
        os.replace(self.tmp, self.final)
        fault("landed", self.final)
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
