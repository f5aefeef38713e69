"""Lean shards: answer logits kept as what the metrics read (correct / wrong tokens' logits,
log-sum-exp, mean logit) in the study's dtype; full-vocabulary logits only with --keep-logits.

The run is a tiny random GPTNeoX saved as a local two-checkpoint run (no training), so these
are unit tests; the expected values come from the stored full logits or from
``metric_per_example`` on random logits.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import hdf5plugin  # noqa: F401 - registers the zstd codec for h5py
import numpy as np
import pytest
import torch
from study_helpers import datasets

import circuits
from circuits import store
from circuits.errors import CircuitsError
from circuits.sweep import sweep
from circuits.tasks import (
    METRIC_NAMES,
    PAD,
    Task,
    answer_logits,
    lean_logits,
    lean_loss,
    lean_metric,
    loss_at_answers,
    metric_per_example,
)

VOCAB = 48
N_EXAMPLES = 6
SWEEP = {"n_examples": N_EXAMPLES, "batch_size": 4, "method": "none", "progress": False}
# float16 keeps 11 significant bits: a stored logit is within 2^-11 of its size, and a metric
# recomputed from a few of them within a few such steps of the logits' scale.
F16 = {"rtol": 4e-3, "atol": 4e-3}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A local run of two random tiny GPTNeoX checkpoints (steps 0 and 10)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from circuits.manifest import parse_manifest

    run = tmp_path_factory.mktemp("lean-run")
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25)
    for seed, step in enumerate((0, 10)):
        torch.manual_seed(seed)
        GPTNeoXForCausalLM(config).eval().save_pretrained(run / f"step{step}")
    manifest = parse_manifest({"name": "lean-run", "source": "local", "local": {"path": "."},
                               "architecture": "GPTNeoXForCausalLM", "tokens_per_step": 1, "steps": [0, 10]})
    (run / "manifest.yaml").write_text(manifest.to_yaml())
    return run


@pytest.fixture(scope="module")
def lean_study(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lean") / "study"
    sweep(tiny_run, "induction", out, **SWEEP)
    return out


@pytest.fixture(scope="module")
def kept_study(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kept") / "study"
    sweep(tiny_run, "induction", out, keep_logits=True, **SWEEP)
    return out


def _shard(study: Path, step: int = 10) -> dict[str, np.ndarray]:
    return datasets(study / store.SHARD_DIR / store.shard_name(step))


def _as_lean(arrays: dict[str, np.ndarray], run: str):
    """The lean arrays of ``run`` in a shard's datasets, as ``tasks.LeanLogits``."""
    from circuits.tasks import LeanLogits

    wrong = arrays.get(f"outputs/wrong_logits_{run}")
    return LeanLogits(correct=torch.from_numpy(arrays[f"outputs/correct_logits_{run}"]),
                      lse=torch.from_numpy(arrays[f"outputs/lse_{run}"]),
                      mean_logit=torch.from_numpy(arrays[f"outputs/mean_logit_{run}"]),
                      wrong=None if wrong is None else torch.from_numpy(wrong))


def _expected_lean(full: np.ndarray, task: Task) -> dict[str, np.ndarray]:
    """Gather / log-sum-exp / mean of stored full logits [example, slot, vocab], NaN where no answer."""
    at = torch.from_numpy(full).double()
    sets = torch.as_tensor(task.correct)
    sets = sets[..., None] if sets.ndim == 2 else sets
    slots = (sets != PAD).any(-1)
    out = {}
    for key, ids in (("correct_logits", task.correct), ("wrong_logits", task.wrong)):
        if ids is None:
            continue
        ids = ids[..., None] if ids.ndim == 2 else ids
        values = at.gather(-1, ids.clamp(min=0))
        out[key] = values.masked_fill((ids == PAD) | ~slots[..., None], float("nan")).numpy()
    out["lse"] = at.logsumexp(-1).masked_fill(~slots, float("nan")).numpy()
    out["mean_logit"] = at.mean(-1).masked_fill(~slots, float("nan")).numpy()
    return out


# ---------------------------------------------------------------- what a shard holds


def test_default_shards_hold_lean_answer_logits_in_the_study_dtype_and_no_full_vocabulary(lean_study):
    arrays = _shard(lean_study)
    study = circuits.open_study(lean_study)
    n_ans = study.task.answer_pos.shape[1]
    assert not [k for k in arrays if k.startswith("outputs/logits")]
    for run in store.OUTPUT_RUNS:
        assert arrays[f"outputs/correct_logits_{run}"].shape == (N_EXAMPLES, n_ans, 1)
        assert arrays[f"outputs/lse_{run}"].shape == arrays[f"outputs/mean_logit_{run}"].shape == (N_EXAMPLES, n_ans)
        assert f"outputs/wrong_logits_{run}" not in arrays  # induction has no wrong answers
        for key in ("correct_logits", "lse", "mean_logit"):
            assert arrays[f"outputs/{key}_{run}"].dtype == np.float16
            assert np.isfinite(arrays[f"outputs/{key}_{run}"]).all()
    for key in store.OUTPUT_KEYS:  # per example, float32 whatever the dtype: tracking reads them
        assert arrays[f"outputs/{key}"].dtype == np.float32 and arrays[f"outputs/{key}"].shape == (N_EXAMPLES,)
    assert study.provenance["keep_logits"] is False and study.shard_provenance(10)["keep_logits"] is False


def test_keep_logits_stores_full_logits_whose_gather_lse_and_mean_are_the_lean_arrays(kept_study):
    arrays = _shard(kept_study)
    study = circuits.open_study(kept_study)
    assert study.provenance["keep_logits"] is True and study.shard_provenance(10)["keep_logits"] is True
    for run in store.OUTPUT_RUNS:
        full = arrays[f"outputs/logits_{run}"]
        assert full.dtype == np.float16 and full.shape == (N_EXAMPLES, study.task.answer_pos.shape[1], VOCAB)
        for key, want in _expected_lean(full, study.task).items():
            np.testing.assert_allclose(arrays[f"outputs/{key}_{run}"].astype(np.float64), want, **F16, err_msg=key)


def test_lean_and_kept_studies_store_the_same_metrics_loss_and_circuit(tiny_run, tmp_path):
    kw = SWEEP | {"method": "eap", "resamples": 2, "trust_steps": 0, "steps": "10", "hooks": "none"}
    lean = _shard(sweep(tiny_run, "induction", tmp_path / "lean", **kw).path)
    kept = _shard(sweep(tiny_run, "induction", tmp_path / "kept", keep_logits=True, **kw).path)
    same = [f"outputs/{k}" for k in store.OUTPUT_KEYS] + ["circuit/scores", "circuit/in_circuit"]
    same += [k for k in lean if k.startswith("outputs/")]
    assert set(kept) - set(lean) == {"outputs/logits_clean", "outputs/logits_corrupted"}
    for key in same:
        np.testing.assert_array_equal(lean[key], kept[key], err_msg=key)


def test_resuming_with_another_keep_logits_is_refused_in_one_line_and_nothing_is_lost(tiny_run, tmp_path):
    out = tmp_path / "study"
    sweep(tiny_run, "induction", out, steps="0", **SWEEP)
    shard = out / store.SHARD_DIR / store.shard_name(0)
    before = {p: p.read_bytes() for p in (shard, out / store.STUDY_FILE, out / store.INDEX_FILE)}
    with pytest.raises(CircuitsError, match=r"another --keep-logits \(False, this sweep: True\); leave out "
                                            r"--keep-logits or sweep into another --out") as refused:
        sweep(tiny_run, "induction", out, keep_logits=True, **SWEEP)
    assert "\n" not in str(refused.value)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (out / store.SHARD_DIR).iterdir()) == [shard.name]


def test_cli_keep_logits_reaches_the_shards(tiny_run, tmp_path, monkeypatch):
    from circuits.cli import main

    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["circuits", "sweep", str(tiny_run), "--task", "induction", "--out", str(out),
                                      "--steps", "0", "--n-examples", "2", "--hooks", "none", "--keep-logits",
                                      "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert "outputs/logits_clean" in _shard(out, 0)
    assert json.loads((out / store.STUDY_FILE).read_text())["keep_logits"] is True


# ---------------------------------------------------------------- recomputing from lean arrays


def test_lean_metric_and_loss_equal_the_stored_metric_and_loss(lean_study):
    study = circuits.open_study(lean_study)
    for step in study.steps:
        for run in store.OUTPUT_RUNS:
            lean = study.lean_logits(step, run)
            np.testing.assert_allclose(lean_metric(lean, study.task).numpy(),
                                       study.array_at(step, f"outputs/metric_{run}"), **F16)
            np.testing.assert_allclose(lean_loss(lean, study.task).numpy(),
                                       study.array_at(step, f"outputs/loss_{run}"), **F16)


def _set_task(metric: str = "logit_diff", with_wrong: bool = True) -> Task:
    """Answer sets and wrong sets padded with PAD, two real slots and one padded slot per row."""
    gen = torch.Generator().manual_seed(5)
    n, seq = 4, 10
    clean = torch.randint(0, VOCAB, (n, seq), generator=gen)
    corrupted = torch.randint(0, VOCAB, (n, seq), generator=gen)
    answer_pos = torch.tensor([[4, 7, 9]] * n)
    correct = torch.tensor([[[3, 5, PAD], [7, PAD, PAD], [PAD, PAD, PAD]]] * n)
    correct[1, 0] = torch.tensor([8, 9, 10])
    wrong = torch.tensor([[[11, PAD], [12, 13], [PAD, PAD]]] * n)
    return Task("sets", clean, corrupted, answer_pos, correct, wrong if with_wrong else None, metric=metric)


def test_answer_and_wrong_sets_are_stored_with_nan_where_there_is_no_answer(tiny_run, tmp_path):
    task = _set_task()
    study = sweep(tiny_run, task, tmp_path / "sets", steps="10", keep_logits=True, hooks="none", **SWEEP)
    arrays = _shard(study.path)
    assert arrays["outputs/correct_logits_clean"].shape == (4, 3, 3)
    assert arrays["outputs/wrong_logits_corrupted"].shape == (4, 3, 2)
    for run in store.OUTPUT_RUNS:
        for key, want in _expected_lean(arrays[f"outputs/logits_{run}"], task).items():
            got = arrays[f"outputs/{key}_{run}"].astype(np.float64)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=key)
            np.testing.assert_allclose(got, want, **F16, err_msg=key)
        np.testing.assert_allclose(lean_metric(study.lean_logits(10, run), task).numpy(),
                                   arrays[f"outputs/metric_{run}"], **F16)


RECOVERABLE = [(m, w) for m in METRIC_NAMES for w in (True, False)
               if m != "kl" and not (m == "logit_diff_max" and not w)]


@pytest.mark.parametrize(("metric", "with_wrong"), RECOVERABLE)
def test_lean_metric_equals_the_metric_of_the_full_logits(metric, with_wrong):
    task = _set_task(metric, with_wrong)
    logits = 3 * torch.randn(task.n_examples, task.seq_len, VOCAB, generator=torch.Generator().manual_seed(1))
    lean = lean_logits(answer_logits(logits, task), task)
    torch.testing.assert_close(lean_metric(lean, task), metric_per_example(logits, task), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_loss(lean, task), loss_at_answers(answer_logits(logits, task), task),
                               rtol=1e-5, atol=1e-5)


def _first_logit(at, task, clean_at):
    """A user metric: it may read any logit, so lean arrays cannot give it."""
    return at[:, 0, 0]


@pytest.mark.parametrize(("metric", "with_wrong", "reads"), [
    ("kl", True, "the whole vocabulary"), ("logit_diff_max", False, "the largest logit outside the correct set"),
    (_first_logit, True, "the whole vocabulary")])
def test_lean_metric_refuses_what_lean_arrays_cannot_give_naming_keep_logits(metric, with_wrong, reads):
    task = _set_task(metric, with_wrong)
    lean = lean_logits(torch.zeros(task.n_examples, 3, VOCAB), task)
    name = re.escape(task.metric_name)
    with pytest.raises(CircuitsError, match=rf"metric '{name}' reads {reads}.*sweep with --keep-logits"):
        lean_metric(lean, task)


# ---------------------------------------------------------------- the format


def _as_format_4(study: Path, tmp_path: Path) -> Path:
    """A copy of ``study`` whose study.json says circuits-study/4 (what the last version wrote)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(study, old)
    record = json.loads((old / store.STUDY_FILE).read_text())
    (old / store.STUDY_FILE).write_text(json.dumps(record | {"format": "circuits-study/4"}))
    return old


def test_circuits_summary_refuses_a_format_4_study_in_one_line(lean_study, tmp_path, monkeypatch, capsys):
    from circuits.cli import main

    monkeypatch.setattr(sys, "argv", ["circuits", "summary", str(_as_format_4(lean_study, tmp_path))])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert "a study of another circuits version (format 'circuits-study/4', this version reads " \
           f"'{store.STUDY_FORMAT}'); sweep again into a new folder" in err

