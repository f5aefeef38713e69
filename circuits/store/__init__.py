"""A study on disk: one HDF5 shard per step, an index stacking them, and the ``Study`` read API.

Layout (documented for h5py-only readers in ``docs/storage.md``)::

    STUDY/study.json                 provenance of the sweep + the task's prompts
    STUDY/index.h5                   virtual datasets stacking every complete shard over steps
    STUDY/shards/step00000600.h5     one per step, complete by construction

Modules, each importing only those above it:

- ``format``: format versions, file names, the stored pattern triangle (pack / unpack);
- ``writer``: ``BackgroundWriter`` and ``ShardWriter``, which land a shard atomically;
- ``index``: finding and checking landed shards, ``index.h5``, leftovers of killed writers;
- ``record``: ``study.json`` and the task stored in it;
- ``study``: the ``Study`` reader and ``open_study``.

The names other modules use are re-exported here (``from circuits import store; store.X``).
Tests reach into the failure paths through ``circuits.faults``.
"""

from circuits.store.format import (
    COMPRESSION_NAME,
    FULL_LOGITS_KEY,
    INDEX_FILE,
    INDEX_FORMAT,
    LEAN_KEYS,
    OUTPUT_KEYS,
    OUTPUT_RUNS,
    PATTERN_LAYOUT,
    PATTERNS,
    RESERVED,
    SHARD_DIR,
    SHARD_FORMAT,
    SHARD_RE,
    STUDY_FILE,
    STUDY_FORMAT,
    lower_triangle,
    pack_patterns,
    positions_of,
    shard_name,
    triangle_size,
    unpack_patterns,
)
from circuits.store.index import (
    Layout,
    check_shard,
    clean_stale_temporaries,
    open_shard,
    scan_shards,
    shard_layouts,
    steps_being_written,
    write_index,
)
from circuits.store.record import read_study_json, task_arrays, task_from_record, write_study_json
from circuits.store.study import Study, open_study
from circuits.store.writer import BackgroundWriter, ShardWriter

__all__ = [
    "Layout",
    "COMPRESSION_NAME", "FULL_LOGITS_KEY", "INDEX_FILE", "INDEX_FORMAT", "LEAN_KEYS", "OUTPUT_KEYS",
    "OUTPUT_RUNS", "PATTERN_LAYOUT", "PATTERNS", "RESERVED",
    "SHARD_DIR", "SHARD_FORMAT", "SHARD_RE", "STUDY_FILE", "STUDY_FORMAT",
    "lower_triangle", "pack_patterns", "positions_of", "shard_name", "triangle_size", "unpack_patterns",
    "check_shard", "clean_stale_temporaries", "open_shard", "scan_shards", "shard_layouts", "steps_being_written", "write_index",
    "read_study_json", "task_arrays", "task_from_record", "write_study_json",
    "Study", "open_study", "BackgroundWriter", "ShardWriter",
]
