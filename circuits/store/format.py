"""What a study looks like on disk: format versions, file names, and the stored pattern triangle.

Everything a reader or writer must agree on lives here, so that the writer, the index and the
``Study`` reader cannot drift apart. ``docs/storage.md`` documents the same for h5py users.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from circuits import chunks
from circuits.errors import first_line

# /6: a shard holds only what its own checkpoint determines: modular addition's key-frequency
# measures (key_freqs, key_share, restricted_loss, excluded_loss) left the shards for the study's
# run_end.h5 (circuits.run_end), computed once the run has ended; an optional llc/ group (the
# local learning coefficient, --analyses llc); study.json's manifest follows a run that grew.
# /5: lean outputs: at each answer slot the correct and wrong tokens' logits, the log-sum-exp
# and the mean logit, in the study's dtype (outputs/correct_logits_*, wrong_logits_*, lse_*,
# mean_logit_*); full-vocabulary logits (outputs/logits_*) only with --keep-logits, recorded
# as keep_logits in study.json and each shard's provenance.
# /4: the study records its graph spec (model.graph), read back instead of guessed from the
# architecture name, and each step stores its nodes' contributions (circuit/node_effects).
# /3: each step's circuit carries its bootstrap (circuit/score_se, inclusion, resample_jaccard,
# stable, stable_faithfulness) and the study records the settings behind it.
# /2: attention patterns stored as their lower triangle (format /1 held the full square).
SHARD_FORMAT = "circuits-shard/6"
STUDY_FORMAT = "circuits-study/6"
INDEX_FORMAT = "circuits-index/6"
STUDY_FILE = "study.json"
INDEX_FILE = "index.h5"
SHARD_DIR = "shards"
SHARD_RE = re.compile(r"^step(\d{8})\.h5$")
TMP_RE = re.compile(r"^\.(step\d{8}\.h5|index\.h5|run_end\.h5)\.tmp-(\d+)$")
# Groups the sweep itself writes; analyses may not use these names.
RESERVED = ("patterns", "activations", "outputs", "task")
PATTERNS = "patterns"  # [example, layer, head, q*(q+1)/2 + k]: the causal lower triangle, row by row
PATTERN_LAYOUT = "lower triangle of [query, key] row by row: [q, k] (k <= q) at q*(q+1)/2 + k; [q, k > q] is 0"
# outputs/{key}_{run} for run in OUTPUT_RUNS. Per example, float32 whatever the study's dtype
# (tracking reads them; a few bytes per prompt):
OUTPUT_RUNS = ("clean", "corrupted")
OUTPUT_KEYS = ("metric_clean", "metric_corrupted", "loss_clean", "loss_corrupted")
# Per answer slot, in the study's dtype (circuits.tasks.LeanLogits): correct_logits and
# wrong_logits [example, n_answers, k] (NaN where a set entry is padding; wrong_logits only when
# the task has wrong answers), lse and mean_logit [example, n_answers].
LEAN_KEYS = ("correct_logits", "wrong_logits", "lse", "mean_logit")
# [example, n_answers, vocab] in the study's dtype, only with --keep-logits.
FULL_LOGITS_KEY = "logits"

# Measured in docs/performance.md (float16 patterns + residuals + head outputs, 64 x 128
# tokens, 2-layer d128): byte shuffle then zstd-1 stores patterns (their triangles) at ~0.22
# of raw float32 squares and activations at ~0.42 (float16 mantissas are nearly random),
# ~0.29 overall, at a fraction of gzip's CPU. Chunks are compressed by circuits.chunks (in
# parallel, off HDF5's pipeline) into that standard pipeline's format: every reader needs
# only ``import hdf5plugin``.
COMPRESSION_NAME = chunks.PIPELINE_NAME
PATTERN_CHUNK_BYTES = 64 * 1024
ACTIVATION_CHUNK_BYTES = 256 * 1024


def shard_name(step: int) -> str:
    """File name of ``step``'s shard inside ``SHARD_DIR`` (zero-padded so names sort by step)."""
    return f"step{step:08d}.h5"


# ---------------------------------------------------------------- patterns: the causal lower triangle
# A causal pattern is 0 above its diagonal. Storing only the triangle halves what is
# compressed, and zstd runs ~4x faster on it than on rows cut by runs of zeros (measured in
# docs/performance.md), for slightly fewer bytes.


def triangle_size(n_positions: int) -> int:
    """Stored length of one pattern over ``n_positions`` tokens."""
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
    index.flags.writeable = False  # cached and shared: no caller may change it
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


def describe_patterns(dataset: h5py.Dataset) -> None:
    """What an h5py-only reader needs to unpack a patterns dataset (shard or index)."""
    dataset.attrs["layout"] = PATTERN_LAYOUT
    dataset.attrs["positions"] = positions_of(dataset.shape[-1])


# ---------------------------------------------------------------- shared by writer, index and reader


def json_text(value: Any) -> str:
    """``value`` as the JSON text stored in a ``provenance`` attribute (sorted keys: stable bytes)."""
    return json.dumps(value, sort_keys=True, default=str)


def fill_value(dtype: np.dtype) -> Any:
    """What a step lacking a dataset reads as, in the index and in ``Study.array``."""
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind == "i":
        return -1
    return 0


def cause(err: BaseException) -> str:
    """An exception's first line, short enough to end a one-line error."""
    return first_line(err, 160)


def format_error(path: Path, what: str, found: Any, expected: str) -> str:
    """The line refusing a file of another format: says when it is only another circuits version."""
    if isinstance(found, str) and found.split("/")[0] == expected.split("/")[0]:
        return (f"{path}: a {what} of another circuits version (format {found!r}, this version reads {expected!r}); "
                "sweep again into a new folder (`circuits sweep RUN --task TASK --out NEW_FOLDER`) to redo it")
    return f"{path}: not a circuits {what} (format {found!r}, expected {expected!r})"
