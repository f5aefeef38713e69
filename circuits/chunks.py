"""Compressed chunk writes that bypass HDF5's filter pipeline, byte-identical to it on disk.

Batches written by a sweep are compressed here and handed to HDF5 as finished chunks
(``write_direct_chunk``). Two reasons, both measured in ``docs/performance.md``:

- zstd (the ``zstandard`` binding) releases the GIL, so a batch's chunks compress in parallel
  on a small thread pool while the forward pass of the next batch runs; HDF5's pipeline
  compresses one chunk at a time on the calling thread.
- HDF5's pipeline copies each chunk out of the batch before filtering it; here a chunk is
  one contiguous slice plus the shuffle copy, and HDF5 only copies the compressed bytes.

What lands on disk is what the standard pipeline ``shuffle -> zstd`` (HDF5's built-in byte
shuffle, then hdf5plugin's zstd filter 32015) writes, plus zstd's own frame checksum
(XXH64, 4 bytes a chunk), so every reader decodes it with ``import hdf5plugin`` and nothing
else, and a damaged chunk fails to decode instead of reading back as wrong numbers.
``tests/test_chunks.py`` checks both.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import h5py
import hdf5plugin
import numpy as np
import zstandard

ZSTD_LEVEL = 1
# h5py keyword arguments declaring the pipeline the chunks below are compressed for.
PIPELINE = {"shuffle": True, **hdf5plugin.Zstd(clevel=ZSTD_LEVEL)}
PIPELINE_NAME = (f"byte shuffle + zstd(clevel={ZSTD_LEVEL}, frame checksums) via hdf5plugin (filter 32015), "
                 "compressed off HDF5's pipeline")

THREADS = max(1, min(4, os.cpu_count() or 1))
_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _compressor() -> zstandard.ZstdCompressor:
    # A ZstdCompressor must not be shared between threads: one per thread.
    if not hasattr(_local, "zstd"):
        # Content size: the filter sizes its output buffer from it. Checksum: libzstd verifies
        # it on decompression, so a flipped bit is an error, never a silently wrong value.
        _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True)
    return _local.zstd


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="circuits-zstd")
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child has none of the parent's threads: it must start its own pool.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def byte_shuffle(chunk: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: byte k of every element, for k = 0..itemsize-1, one after another."""
    size = chunk.dtype.itemsize
    words = np.ascontiguousarray(chunk).reshape(-1).view(f"<u{size}")
    if size == 1:
        return words
    # Shifts and truncating casts on whole words: ~4x faster than a strided byte transpose.
    planes = np.empty((size, words.size), np.uint8)
    for k in range(size):
        np.copyto(planes[k], words >> (8 * k) if k else words, casting="unsafe")
    return planes


def compress_chunk(chunk: np.ndarray) -> bytes:
    """One full chunk as the ``shuffle -> zstd`` pipeline stores it."""
    # The stub asks for bytes, but zstandard reads any buffer; a contiguous array is one (no copy).
    return _compressor().compress(byte_shuffle(chunk))  # type: ignore[arg-type]


def _chunk_slices(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Every chunk-aligned block of an array of ``shape`` (a block may be short at the end)."""
    starts = [range(0, extent, step) for extent, step in zip(shape, chunks, strict=True)]
    return [tuple(slice(s, min(s + c, e)) for s, c, e in zip(start, chunks, shape, strict=True))
            for start in itertools.product(*starts)]


def _full_chunk(block: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    """HDF5 stores edge chunks at full size: pad a short block with zeros."""
    if block.shape == chunks:
        return block
    padded = np.zeros(chunks, dtype=block.dtype)
    padded[tuple(slice(0, n) for n in block.shape)] = block
    return padded


def write_rows(dataset: h5py.Dataset, start: int, array: np.ndarray) -> None:
    """Write ``array`` into rows ``start:start+len(array)`` of ``dataset``, compressed in parallel.

    ``dataset`` must have been created with ``**PIPELINE`` and ``start`` must fall on a chunk
    boundary of the first axis; the rows written must cover whole chunks, except at the
    dataset's end.
    """
    chunks = dataset.chunks
    if array.shape[1:] != dataset.shape[1:]:
        raise ValueError(f"{dataset.name}: rows of shape {array.shape[1:]} written into rows of shape {dataset.shape[1:]}")
    if start % chunks[0]:
        raise ValueError(f"{dataset.name}: row {start} does not align with chunks of {chunks[0]} rows")
    if start + array.shape[0] != dataset.shape[0] and array.shape[0] % chunks[0]:
        raise ValueError(f"{dataset.name}: {array.shape[0]} rows leave a partial chunk inside the dataset")
    array = array.astype(dataset.dtype, copy=False)
    blocks = _chunk_slices(array.shape, chunks)
    # One task per thread, each an equal share of the chunks: per-task overhead stays out of
    # the hundreds of small chunks a batch of patterns makes.
    runs = [blocks[i::THREADS] for i in range(min(THREADS, len(blocks)))]
    compressed = _threads().map(lambda run: [compress_chunk(_full_chunk(array[b], chunks)) for b in run], runs)
    for run, datas in zip(runs, compressed, strict=True):
        for block, data in zip(run, datas, strict=True):
            dataset.id.write_direct_chunk((start + block[0].start, *(s.start for s in block[1:])), data)
