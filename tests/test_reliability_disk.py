"""A full disk mid-sweep: earlier shards stay intact, the cause is one line, a re-run completes.

The failure is injected with ``CIRCUITS_FAULT=POINT@N:enospc`` (``circuits.faults``, set by the
``inject_fault`` fixture): the writer raises ``OSError(ENOSPC)`` exactly where a real full disk
would fail, half-way through a shard or through the index.
"""

from __future__ import annotations

import numpy as np
import pytest

import circuits
from circuits import store
from circuits.errors import CircuitsError
from circuits.sweep import sweep

KW = {"n_examples": 4, "batch_size": 2, "method": "none", "progress": False}


@pytest.fixture
def steps(induction_run) -> list[int]:
    """First, middle and last step of the run."""
    schedule = circuits.load_manifest(induction_run).steps
    return [schedule[0], schedule[len(schedule) // 2], schedule[-1]]


def run_sweep(run, out, steps):
    return sweep(run, "induction", out, steps=",".join(map(str, steps)), **KW)


def leftovers(out) -> list[str]:
    return sorted(p.name for p in (out / store.SHARD_DIR).iterdir() if not store.SHARD_RE.match(p.name))


def test_disk_full_mid_shard_keeps_earlier_shards_and_a_rerun_completes(induction_run, tmp_path, inject_fault, steps):
    out = tmp_path / "study"
    inject_fault("batch@3:enospc")  # the middle step's first batch (two batches per step)
    with pytest.raises(CircuitsError) as caught:
        run_sweep(induction_run, out, steps)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{out / store.SHARD_DIR / store.shard_name(steps[1])}: cannot write this shard")
    assert "no space left on device" in message and "re-run the sweep" in message
    assert leftovers(out) == []  # the half-written temporary shard is gone

    study = circuits.open_study(out)
    assert study.steps == steps[:1] and study.problems == {}
    metric_0 = study.metric()[0]
    assert np.isfinite(study.pattern(steps[0], 1, 3, 3)).all()

    inject_fault(None)
    study = run_sweep(induction_run, out, steps)
    assert study.steps == steps and study.problems == {}
    assert study.metric()[0] == metric_0
    assert leftovers(out) == []


def test_disk_full_while_finishing_a_shard(induction_run, tmp_path, inject_fault, steps):
    out = tmp_path / "study"
    inject_fault("finish@2:enospc")
    with pytest.raises(CircuitsError, match=rf"{store.shard_name(steps[1])}: cannot write this shard \(no space left on device\)"):
        run_sweep(induction_run, out, steps)
    assert circuits.open_study(out).steps == steps[:1]
    assert leftovers(out) == []
    inject_fault(None)
    assert run_sweep(induction_run, out, steps).steps == steps


def test_disk_full_while_rebuilding_the_index_keeps_the_shards(induction_run, tmp_path, inject_fault, steps):
    out = tmp_path / "study"
    inject_fault("index@2:enospc")  # the first index is written at the start; the 2nd after step 0 lands
    with pytest.raises(CircuitsError) as caught:
        run_sweep(induction_run, out, steps)
    assert str(caught.value).startswith(f"{out / store.INDEX_FILE}: cannot write the index (no space left on device)")
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert circuits.open_study(out).steps == steps[:1]  # the shard landed before its index: kept
    inject_fault(None)
    study = run_sweep(induction_run, out, steps)
    assert study.steps == steps
    import h5py

    with h5py.File(out / store.INDEX_FILE, "r") as index:
        assert [int(s) for s in index["steps"][()]] == steps


def test_a_shard_whose_write_failed_never_lands_even_if_its_finish_was_queued(tmp_path, inject_fault):
    """The writer hands an error to the caller once; the failed shard's finish, queued before the
    caller saw the error, must not then mark a shard that misses rows as complete."""
    (tmp_path / store.SHARD_DIR).mkdir()
    inject_fault("batch@1:enospc")
    final = tmp_path / store.SHARD_DIR / store.shard_name(7)
    with store.BackgroundWriter() as writer:
        shard = store.ShardWriter(final, 4, 2, writer)
        shard.write_batch(0, {store.PATTERNS: np.ones((2, 1, 1, 6), np.float16)})
        with pytest.raises(CircuitsError, match="no space left on device"):
            writer.wait()  # the caller sees the error (and the writer forgets it)
        shard.write_batch(2, {store.PATTERNS: np.ones((2, 1, 1, 6), np.float16)})
        shard.finish({"step": 7, "tokens_seen": 0})
        writer.wait()
        shard.abort()
    assert not final.exists()
    assert list((tmp_path / store.SHARD_DIR).iterdir()) == []


def test_a_fault_acts_on_the_nth_hit_of_its_point_only(tmp_path, inject_fault):
    from circuits.faults import fault

    inject_fault("index@2:enospc,batch:enospc")
    fault("index", tmp_path / "a")  # 1st index hit: not yet
    with pytest.raises(OSError, match="No space left on device") as caught:
        fault("index", tmp_path / "b")
    assert caught.value.filename == str(tmp_path / "b")
    fault("index", tmp_path / "c")  # the 3rd passes again
    with pytest.raises(OSError):
        fault("batch", tmp_path / "d")  # no @N: the 1st hit
    inject_fault(None)
    fault("batch", tmp_path / "e")  # unset: inert


@pytest.mark.parametrize("spec, match", [("bacth@1:pause", "POINT one of batch"), ("batch@1:pasue", "ACTION one of pause"),
                                         ("batch@x:pause", r"whole number \(POINT@N\)")])
def test_a_misspelt_fault_is_refused_rather_than_never_firing(tmp_path, inject_fault, spec, match):
    from circuits.faults import fault

    inject_fault(spec)
    with pytest.raises(ValueError, match=match):
        fault("batch", tmp_path)
