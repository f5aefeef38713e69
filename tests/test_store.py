"""The study on disk without a model: atomic shards, the index, and the Study read API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the zstd codec for h5py
import numpy as np
import pytest

from circuits import store
from circuits.errors import CircuitsError
from circuits.tasks import induction_task

N, LAYERS, HEADS, SEQ = 4, 2, 3, 7


def pattern_of(step: int) -> np.ndarray:
    rng = np.random.default_rng(step)
    scores = np.tril(rng.random((N, LAYERS, HEADS, SEQ, SEQ)) + 1e-3)  # causal: 0 above the diagonal
    return (scores / scores.sum(-1, keepdims=True)).astype(np.float16)


def write_shard(study: Path, step: int, writer: store.BackgroundWriter, extra: dict | None = None,
                finish: bool = True) -> store.ShardWriter:
    shard = store.ShardWriter(study / store.SHARD_DIR / store.shard_name(step), N, 2, writer)
    patterns = pattern_of(step)
    for start in (0, 2):
        shard.write_batch(start, {store.PATTERNS: store.pack_patterns(patterns[start:start + 2]),
                                  "outputs/metric_clean": np.full(2, float(step), np.float32)})
    shard.write_static(extra or {})
    if finish:
        shard.finish({"step": step, "tokens_seen": 10 * step})
    writer.wait()
    return shard


def make_study(root: Path, steps=(0, 10, 20)) -> Path:
    from circuits.visit import task_record

    task = induction_task(N, half_len=3, vocab=10)
    (root / store.SHARD_DIR).mkdir(parents=True)
    store.write_study_json(root, {
        "format": store.STUDY_FORMAT, "manifest": "name: x\n", "task": task_record(task),
        "model": {"n_layers": LAYERS, "n_heads": HEADS,
                  "graph": {"n_layers": LAYERS, "n_heads": HEADS, "has_mlp": False, "parallel_attn_mlp": False}},
        "hooks": [], "dtype": "float16", "keep_logits": False,
    })
    with store.BackgroundWriter() as writer:
        for step in steps:
            extra = {"heads/induction": np.full((LAYERS, HEADS), step, np.float32),
                     "circuit/in_circuit": np.ones((2, 2), bool)} if step != 10 else {}
            write_shard(root, step, writer, extra)
    layouts, tokens, _ = store.shard_layouts(store.scan_shards(root).items())
    store.write_index(root, layouts, tokens, {"test": True})
    return root


def test_shard_lands_only_when_finished_with_its_completion_mark(tmp_path):
    (tmp_path / store.SHARD_DIR).mkdir()
    with store.BackgroundWriter() as writer:
        shard = write_shard(tmp_path, 5, writer, finish=False)
        assert shard.tmp.exists() and not shard.final.exists()
        shard.finish({"step": 5, "tokens_seen": 50})
        writer.wait()
    assert shard.final.exists() and not shard.tmp.exists()
    with h5py.File(shard.final, "r") as f:
        assert f.attrs["complete"] and f.attrs["step"] == 5
        assert json.loads(f.attrs["provenance"])["tokens_seen"] == 50
        np.testing.assert_array_equal(store.unpack_patterns(f[store.PATTERNS][()]), pattern_of(5))
        assert f[store.PATTERNS].chunks[1:3] == (1, 1)  # one (layer, head) per chunk


def test_a_failed_write_surfaces_and_its_shard_never_lands(tmp_path):
    (tmp_path / store.SHARD_DIR).mkdir()
    with store.BackgroundWriter() as writer:
        shard = store.ShardWriter(tmp_path / store.SHARD_DIR / store.shard_name(1), N, 2, writer)
        shard.write_batch(0, {store.PATTERNS: store.pack_patterns(pattern_of(1)[:2])})
        shard.write_batch(2, {store.PATTERNS: np.zeros((2, 9), np.float16)})  # wrong shape
        shard.finish({"step": 1, "tokens_seen": 0})
        with pytest.raises(ValueError, match="shape"):
            writer.wait()
        shard.abort()
    assert list((tmp_path / store.SHARD_DIR).iterdir()) == []


def test_index_stacks_steps_and_reads_with_h5py_alone(tmp_path):
    root = make_study(tmp_path)
    with h5py.File(root / "index.h5", "r") as index:  # the recipe of docs/storage.md
        steps = list(index["steps"][()])
        assert steps == [0, 10, 20]
        i = steps.index(10)
        packed = index["patterns"][i, 3, 1, 2]  # the lower triangle, row by row
        n = index["patterns"].attrs["positions"]
        pattern = np.zeros((n, n), packed.dtype)
        pattern[np.tril_indices(n)] = packed
        np.testing.assert_array_equal(pattern, pattern_of(10)[3, 1, 2])
        assert np.isnan(index["heads/induction"][i]).all()  # step 10 has no head scores
        assert list(index["tokens_seen"][()]) == [0, 100, 200]


def test_array_stacks_steps_and_fills_the_steps_that_lack_a_key(tmp_path):
    study = store.open_study(make_study(tmp_path))
    heads = study.array("heads/induction")
    assert heads.shape == (3, LAYERS, HEADS)
    np.testing.assert_array_equal(heads[[0, 2], 0, 0], [0, 20])
    assert np.isnan(heads[1]).all()
    assert study.array("circuit/in_circuit")[1].sum() == 0 and study.array("circuit/in_circuit")[2].all()
    assert study.has("heads/induction") and not study.has("heads/previous")
    assert study.keys("heads") == ["heads/induction"]
    np.testing.assert_array_equal(study.metric(), [0, 10, 20])
    with pytest.raises(CircuitsError, match="step 10 holds no 'heads/induction'"):
        study.array_at(10, "heads/induction")


def test_pattern_reads_float32_of_one_head(tmp_path):
    study = store.open_study(make_study(tmp_path))
    got = study.pattern(20, 1, 2, 3)
    assert got.dtype == np.float32 and got.shape == (SEQ, SEQ)
    np.testing.assert_array_equal(got, pattern_of(20)[3, 1, 2].astype(np.float32))


def test_refresh_picks_up_shards_landed_after_opening(tmp_path):
    root = make_study(tmp_path, steps=(0,))
    study = store.open_study(root)
    assert study.steps == [0]
    with store.BackgroundWriter() as writer:
        write_shard(root, 30, writer)
    assert study.steps == [0]
    assert study.refresh().steps == [0, 30]


def test_temporary_files_are_never_steps(tmp_path):
    root = make_study(tmp_path, steps=(0,))
    (root / store.SHARD_DIR / ".step00000040.h5.tmp-12345").write_bytes(b"")
    assert store.open_study(root).steps == [0]


def test_a_folder_without_study_json_is_refused(tmp_path):
    with pytest.raises(CircuitsError, match="not a study, no study.json"):
        store.open_study(tmp_path)
    with pytest.raises(CircuitsError, match="the folder does not exist"):
        store.open_study(tmp_path / "missing")


def test_task_is_rebuilt_from_the_study(tmp_path):
    study = store.open_study(make_study(tmp_path))
    task = induction_task(N, half_len=3, vocab=10)
    assert study.task.prompt_hash() == task.prompt_hash()
    np.testing.assert_array_equal(study.tokens(1, corrupted=True), task.corrupted[1].numpy())


def test_a_damaged_shard_replaced_by_a_complete_one_becomes_a_step_on_refresh(tmp_path):
    root = make_study(tmp_path, steps=(0,))
    (root / store.SHARD_DIR / store.shard_name(40)).write_bytes(b"not hdf5")
    study = store.open_study(root)
    assert study.steps == [0] and "corrupted or truncated shard" in study.problems[40]
    (root / store.SHARD_DIR / store.shard_name(40)).unlink()
    with store.BackgroundWriter() as writer:
        write_shard(root, 40, writer)
    assert study.refresh().steps == [0, 40] and not study.problems


def _flip_a_bit_inside(path: Path, dataset: str) -> None:
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        byte = raw.read(1)[0]
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(bytes([byte ^ 0x04]))


@pytest.mark.parametrize("dataset", ["heads/induction", store.PATTERNS])
def test_a_flipped_bit_in_a_shard_is_a_corrupted_shard_error_not_a_wrong_number(tmp_path, dataset):
    root = make_study(tmp_path)
    _flip_a_bit_inside(root / store.SHARD_DIR / store.shard_name(20), dataset)
    study = store.open_study(root)
    with pytest.raises(CircuitsError, match=r"step00000020\.h5: corrupted shard, cannot read"):
        study.array(dataset) if dataset != store.PATTERNS else study.pattern(20, 0, 0, 0)


def test_a_study_of_an_older_format_is_refused_with_a_hint_to_sweep_again(tmp_path):
    root = make_study(tmp_path)
    record = json.loads((root / store.STUDY_FILE).read_text())
    (root / store.STUDY_FILE).write_text(json.dumps(record | {"format": "circuits-study/4"}))
    with pytest.raises(CircuitsError, match=r"another circuits version \(format 'circuits-study/4'.*sweep again"):
        store.open_study(root)


def test_a_shard_of_an_older_format_is_a_problem_not_a_step(tmp_path):
    root = make_study(tmp_path)
    with h5py.File(root / store.SHARD_DIR / store.shard_name(20), "r+") as f:
        f.attrs["format"] = "circuits-shard/4"
    study = store.open_study(root)
    assert study.steps == [0, 10] and "another circuits version" in study.problems[20]


def test_patterns_pack_to_their_lower_triangle_and_back():
    square = pattern_of(3)
    packed = store.pack_patterns(square)
    assert packed.shape == (N, LAYERS, HEADS, SEQ * (SEQ + 1) // 2)
    np.testing.assert_array_equal(packed[0, 0, 0, :3], [square[0, 0, 0, 0, 0], *square[0, 0, 0, 1, :2]])
    np.testing.assert_array_equal(store.unpack_patterns(packed), square)


def test_steps_being_written_are_those_whose_temporary_shard_a_live_process_holds(tmp_path):
    import subprocess

    from circuits.store import SHARD_DIR, steps_being_written

    shards = tmp_path / SHARD_DIR
    shards.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (shards / f".step00000300.h5.tmp-{os.getppid()}").write_bytes(b"")  # our parent: alive, not us
    (shards / f".step00000600.h5.tmp-{gone.pid}").write_bytes(b"")  # its writer exited
    assert steps_being_written(tmp_path) == {300}
