"""A step's visit reads only its own checkpoint; what needs the final one is computed at run end.

On ``tiny_modadd_run`` (p=31, steps 0..300): a study of the run while only its first
checkpoints existed, a study of the whole run, and the run-end file (``circuits.run_end``)
against restricted / excluded loss computed by hand with numpy from a fresh forward pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from circuits.errors import CircuitsError
from circuits.manifest import load_manifest

EARLY = "range:0-64"  # the steps whose checkpoints exist in the unfinished copy of the run
N_KEY = 5  # the default number of key frequencies (progress.N_KEY_FREQS)


def _unfinished_copy(run: Path, out: Path, last: int = 64) -> Path:
    """The run as it was while training: the checkpoints up to ``last`` only."""
    late = {f"step{s}" for s in load_manifest(run).steps if s > last}
    shutil.copytree(run, out, ignore=lambda folder, names: [n for n in names if n in late])
    return out


def _sweep(run: Path, out: Path, **settings):
    from circuits.sweep import sweep

    return sweep(run, "modular-addition", out, hooks="none", progress=False, **settings)


@pytest.fixture(scope="module")
def unfinished_run(tiny_modadd_run, tmp_path_factory) -> Path:
    return _unfinished_copy(tiny_modadd_run, tmp_path_factory.mktemp("unfinished") / "run")


@pytest.fixture(scope="module")
def early_study(unfinished_run, tmp_path_factory):
    """A study made while the run was training: its checkpoints to step 64 swept."""
    return _sweep(unfinished_run, tmp_path_factory.mktemp("early") / "study", steps=EARLY)


@pytest.fixture(scope="module")
def full_study(tiny_modadd_run, tmp_path_factory):
    """A study of the whole run, its final step included."""
    return _sweep(tiny_modadd_run, tmp_path_factory.mktemp("full") / "study")


# ---------------------------------------------------------------- the independent computation


def _by_hand(run: Path, step: int):
    """(logits [p*p, p] float64, answers, train indices, p) of a fresh forward over every pair ``a b =``."""
    import torch

    import circuits
    from circuits.recipes.modular_addition import train_test_split

    manifest = load_manifest(run)
    p = int(manifest.local.options["p"])
    a, b = np.divmod(np.arange(p * p), p)  # a major, as the run orders its pairs
    tokens = torch.tensor(np.stack([a, b, np.full_like(a, p)], axis=1))
    with torch.no_grad():
        logits = circuits.load(manifest, step)(tokens)[:, -1, :p].double().numpy()
    train, _ = train_test_split(p, float(manifest.local.options["train_frac"]), int(manifest.local.seed or 0))
    return logits, (a + b) % p, train.numpy(), p


def _final_keys_by_hand(run: Path) -> np.ndarray:
    """Top ``N_KEY`` frequencies of the final embedding, by the discrete Fourier transform."""
    import circuits

    manifest = load_manifest(run)
    p = int(manifest.local.options["p"])
    W_E = circuits.load(manifest, manifest.steps[-1]).W_E.detach().double().numpy()[:p]
    power = (np.abs(np.fft.fft(W_E, axis=0)) ** 2).sum(axis=1)[1 : (p - 1) // 2 + 1]  # k = 1..(p-1)/2
    return np.sort(np.argsort(-power)[:N_KEY] + 1)


def _cross_entropy(logits: np.ndarray, answers: np.ndarray) -> float:
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(lse - logits[np.arange(len(answers)), answers]))


def _restricted_excluded_by_hand(logits, answers, train, p, keys) -> tuple[float, float]:
    """Least-squares fit of each output's logits on 1, cos(w_k(a+b)), sin(w_k(a+b)) over the keys."""
    s = answers.astype(float)  # (a + b) mod p: the same cosines as a + b
    w = 2 * np.pi * np.asarray(keys) / p
    X = np.column_stack([np.ones_like(s), np.cos(np.outer(s, w)), np.sin(np.outer(s, w))])
    fitted = X @ np.linalg.lstsq(X, logits, rcond=None)[0]  # constant + key-frequency components
    key_part = fitted - logits.mean(axis=0)  # the constant is orthogonal to every key direction
    return _cross_entropy(fitted, answers), _cross_entropy((logits - key_part)[train], answers[train])


# ---------------------------------------------------------------- a step's visit


def _shard_numbers(study, step: int) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(study.path / "shards" / f"step{step:08d}.h5", "r") as f:
        found: dict[str, np.ndarray] = {}
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_a_steps_shard_holds_the_same_numbers_before_and_after_later_checkpoints_exist(early_study, full_study):
    assert early_study.steps and set(early_study.steps) < set(full_study.steps)
    for step in early_study.steps:
        early, full = _shard_numbers(early_study, step), _shard_numbers(full_study, step)
        assert sorted(early) == sorted(full), step
        for name in early:
            np.testing.assert_array_equal(early[name], full[name], err_msg=f"step {step} {name}")


def test_a_visit_stores_only_what_its_own_checkpoint_determines(full_study):
    stored = set(_shard_numbers(full_study, full_study.steps[0]))
    assert {"progress/embed_freq_norm", "progress/top_share", "progress/test_loss"} <= stored
    assert not stored & {"progress/key_freqs", "progress/key_share", "progress/restricted_loss",
                         "progress/excluded_loss"}


# ---------------------------------------------------------------- at run end


def test_a_sweep_that_visits_the_final_step_writes_the_run_end_measures(full_study, tiny_modadd_run):
    manifest = load_manifest(tiny_modadd_run)
    assert (full_study.path / "run_end.h5").is_file()
    assert full_study.run_end.steps.tolist() == full_study.steps
    prov = full_study.run_end.provenance
    assert prov["final_step"] == manifest.steps[-1] and prov["n_key"] == N_KEY
    for key in ("progress/restricted_loss", "progress/excluded_loss", "progress/key_freqs"):
        assert full_study.has(key) and key in full_study.keys("progress")


def test_the_run_end_key_frequencies_are_the_final_embeddings_top_ones(full_study, tiny_modadd_run):
    keys = _final_keys_by_hand(tiny_modadd_run)
    assert full_study.run_end.provenance["key_freqs"] == keys.tolist()
    stacked = full_study.array("progress/key_freqs")
    assert stacked.shape == (len(full_study.steps), N_KEY) and (stacked == keys).all()


@pytest.mark.parametrize("at", [0, 5, -1])  # the first step, one mid-way (memorising), the final one
def test_run_end_losses_equal_an_independent_computation(full_study, tiny_modadd_run, at):
    step = full_study.steps[at]
    want = _restricted_excluded_by_hand(*_by_hand(tiny_modadd_run, step), _final_keys_by_hand(tiny_modadd_run))
    got = (float(full_study.array_at(step, "progress/restricted_loss")),
           float(full_study.array_at(step, "progress/excluded_loss")))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    row = full_study.steps.index(step)
    assert full_study.array("progress/restricted_loss")[row] == got[0]


def test_key_share_is_computed_from_the_study(full_study, tiny_modadd_run):
    from circuits.tracking import track

    keys = _final_keys_by_hand(tiny_modadd_run)
    squared = full_study.array("progress/embed_freq_norm").astype(float) ** 2
    want = squared[:, keys - 1].sum(axis=1) / squared.sum(axis=1)
    np.testing.assert_allclose(track(full_study).curves["progress/key_share"], want, rtol=1e-12)


def test_tracking_reads_the_run_end_curves(full_study):
    from circuits.tracking import summary_text, track

    tracking = track(full_study)
    for name in ("progress/restricted_loss", "progress/excluded_loss"):
        np.testing.assert_array_equal(tracking.curves[name], full_study.array(name))
    assert "computed when the run ends" not in summary_text(tracking)


# ---------------------------------------------------------------- a run still training


def test_a_study_of_an_unfinished_run_lacks_the_run_end_measures(early_study):
    assert early_study.run_end is None and not (early_study.path / "run_end.h5").exists()
    for key in ("progress/restricted_loss", "progress/excluded_loss", "progress/key_freqs", "progress/key_share"):
        assert not early_study.has(key)
        with pytest.raises(CircuitsError, match="no step holds"):
            early_study.array(key)


def test_the_summary_of_an_unfinished_run_says_when_those_measures_come(early_study):
    from circuits.tracking import summary_text, track

    tracking = track(early_study)
    assert not {"progress/restricted_loss", "progress/excluded_loss", "progress/key_share"} & set(tracking.curves)
    said = [line for line in summary_text(tracking).splitlines() if "computed when the run ends" in line]
    assert len(said) == 1 and "circuits finalize" in said[0]


def test_finalize_refuses_while_the_final_checkpoint_is_missing(monkeypatch, capsys, early_study):
    from test_cli_foundation import assert_one_line_error, run_cli

    code, _, err = run_cli(monkeypatch, capsys, "finalize", str(early_study.path))
    assert_one_line_error(code, err, r"has not ended, its final step 300 has no checkpoint yet")
    assert not (early_study.path / "run_end.h5").exists()


def test_finalize_once_the_run_has_ended(monkeypatch, capsys, tiny_modadd_run, full_study, tmp_path):
    from test_cli_foundation import run_cli

    run = _unfinished_copy(tiny_modadd_run, tmp_path / "run")
    study = _sweep(run, tmp_path / "study", steps=EARLY)
    for step in load_manifest(run).steps:  # the run goes on and ends
        if not (run / f"step{step}").exists():
            shutil.copytree(tiny_modadd_run / f"step{step}", run / f"step{step}")
    code, out, _ = run_cli(monkeypatch, capsys, "finalize", str(study.path))
    assert code == 0 and f"run-end measures of {len(study.steps)} steps" in out
    finished = study.refresh()
    rows = [full_study.steps.index(s) for s in finished.steps]
    for key in ("progress/restricted_loss", "progress/excluded_loss"):
        np.testing.assert_array_equal(finished.array(key), full_study.array(key)[rows])


def test_a_later_sweep_of_more_steps_extends_the_run_end_file(tiny_modadd_run, full_study, tmp_path):
    study = _sweep(tiny_modadd_run, tmp_path / "study", steps="0,300")
    assert study.run_end.steps.tolist() == [0, 300]
    study = _sweep(tiny_modadd_run, tmp_path / "study", steps="0,64,300")  # resumed with one step more
    assert study.run_end.steps.tolist() == [0, 64, 300]
    rows = [full_study.steps.index(s) for s in (0, 64, 300)]
    np.testing.assert_array_equal(study.array("progress/excluded_loss"), full_study.array("progress/excluded_loss")[rows])


def test_a_damaged_run_end_file_is_set_aside_and_recomputed(tiny_modadd_run, full_study, tmp_path):
    from circuits.run_end import finalize
    from circuits.store import open_study

    study_dir = tmp_path / "study"
    shutil.copytree(full_study.path, study_dir)
    (study_dir / "run_end.h5").write_bytes(b"not hdf5")
    damaged = open_study(study_dir)
    assert damaged.run_end is None and "damaged run-end file" in damaged.run_end_problem
    assert not damaged.has("progress/restricted_loss")
    with pytest.warns(UserWarning, match="moved to run_end.h5.corrupt"):
        finalize(study_dir)
    assert (study_dir / "run_end.h5.corrupt").read_bytes() == b"not hdf5"
    np.testing.assert_array_equal(damaged.refresh().array("progress/restricted_loss"),
                                  full_study.array("progress/restricted_loss"))


# ---------------------------------------------------------------- given key frequencies


def test_given_key_frequencies_are_used_in_the_visit_with_nothing_left_for_run_end(unfinished_run, tmp_path):
    from circuits.tracking import summary_text, track

    keys = [1, 2, 3]
    study = _sweep(unfinished_run, tmp_path / "study", steps="0,64", options={"key_freqs": keys})
    assert study.run_end is None
    step = 64
    want = _restricted_excluded_by_hand(*_by_hand(unfinished_run, step), np.asarray(keys))
    got = (float(study.array_at(step, "progress/restricted_loss")), float(study.array_at(step, "progress/excluded_loss")))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert study.array_at(step, "progress/key_freqs").tolist() == keys
    assert "computed when the run ends" not in summary_text(track(study))


def test_finalize_has_nothing_to_do_for_a_study_without_grokking_measures(monkeypatch, capsys, unfinished_run,
                                                                          tmp_path):
    from test_cli_foundation import run_cli

    _sweep(unfinished_run, tmp_path / "study", steps="0", analyses=())
    code, out, _ = run_cli(monkeypatch, capsys, "finalize", str(tmp_path / "study"))
    assert code == 0 and "nothing is computed at run end" in out
    assert not (tmp_path / "study" / "run_end.h5").exists()
