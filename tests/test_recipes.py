"""Built-in training runs: deterministic per seed, the induction phase change, grokking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuits.checkpoint import read_checkpoint_config
from circuits.errors import CircuitsError
from circuits.manifest import load_manifest
from circuits.recipes import train_recipe
from circuits.steps import log_then_linear

SMALL_INDUCTION = {"steps": 40, "checkpoint_every": 20}


def files_by_step(run: Path) -> dict[str, bytes]:
    return {
        f"{d.name}/{f.name}": f.read_bytes()
        for d in sorted(run.glob("step*"))
        for f in sorted(d.iterdir())
    }


@pytest.fixture(scope="module")
def small_induction_seed0(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("induction-seed0")
    train_recipe("induction", out, progress=False, seed=0, **SMALL_INDUCTION)
    return out


def test_same_seed_gives_bit_identical_checkpoints(small_induction_seed0: Path, tmp_path: Path):
    train_recipe("induction", tmp_path, progress=False, seed=0, **SMALL_INDUCTION)
    first, second = files_by_step(small_induction_seed0), files_by_step(tmp_path)
    assert sorted(first) == sorted(second)
    assert any(name.endswith("model.safetensors") for name in first)
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_gives_different_weights(small_induction_seed0: Path, tmp_path: Path):
    train_recipe("induction", tmp_path, progress=False, seed=1, **SMALL_INDUCTION)
    for step in (0, 40):
        a = (small_induction_seed0 / f"step{step}" / "model.safetensors").read_bytes()
        b = (tmp_path / f"step{step}" / "model.safetensors").read_bytes()
        assert a != b


def test_run_folder_holds_manifest_and_one_folder_per_scheduled_step(small_induction_seed0: Path):
    manifest = load_manifest(small_induction_seed0)
    assert manifest.steps == log_then_linear(40, 20) == [0, 1, 2, 4, 8, 16, 20, 40]
    assert manifest.local.path == "." and manifest.local.recipe == "induction"
    assert manifest.local.seed == 0
    assert sorted(p.name for p in small_induction_seed0.glob("step*")) == sorted(f"step{s}" for s in manifest.steps)
    for step in manifest.steps:
        folder = small_induction_seed0 / f"step{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        config = read_checkpoint_config(folder)
        assert config["step"] == step and config["seed"] == 0
        assert config["tokens_seen"] == step * manifest.tokens_per_step
    assert not list(small_induction_seed0.glob(".step*")), "temporary folders left behind"


def test_retraining_the_same_run_into_its_folder_changes_nothing(small_induction_seed0: Path):
    before = {p: p.stat().st_mtime_ns for p in small_induction_seed0.rglob("*")}
    train_recipe("induction", small_induction_seed0, progress=False, seed=0, **SMALL_INDUCTION)
    assert {p: p.stat().st_mtime_ns for p in small_induction_seed0.rglob("*")} == before


def test_another_run_in_the_folder_is_refused_and_left_intact(small_induction_seed0: Path):
    before = files_by_step(small_induction_seed0)
    manifest_before = (small_induction_seed0 / "manifest.yaml").read_bytes()
    with pytest.raises(CircuitsError, match=r"holds another run \(induction-2l, recipe induction, seed 0\)"):
        train_recipe("induction", small_induction_seed0, progress=False, seed=7, **SMALL_INDUCTION)
    assert files_by_step(small_induction_seed0) == before
    assert (small_induction_seed0 / "manifest.yaml").read_bytes() == manifest_before


def test_induction_run_has_its_phase_change(induction_run: Path):
    history = json.loads((induction_run / "metrics.json").read_text())
    assert len(history) >= 30
    assert history[0]["step"] == 0
    assert history[0]["repeated_loss"] > 3.5
    assert history[-1]["repeated_loss"] < 0.5
    # the first half of each sequence is random: nothing to learn there beyond unigram stats
    assert history[-1]["first_half_loss"] > 3.5


def test_tiny_modadd_run_checkpoints_and_metrics(tiny_modadd_run: Path):
    manifest = load_manifest(tiny_modadd_run)
    assert manifest.name == "modadd-p31"
    assert manifest.steps == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300]
    assert manifest.tokens_per_step == round(0.7 * 31 * 31) * 3
    history = json.loads((tiny_modadd_run / "metrics.json").read_text())
    assert [row["step"] for row in history] == manifest.steps
    assert history[-1]["train_acc"] == 1.0


@pytest.mark.slow
@pytest.mark.xdist_group("grokking")  # one worker: the grokking run is trained once
def test_small_modular_addition_groks(grokking_run: Path):
    history = json.loads((grokking_run / "metrics.json").read_text())
    memorised = next(row["step"] for row in history if row["train_acc"] == 1.0)
    generalised = next(row["step"] for row in history if row["test_acc"] > 0.95)
    assert memorised < generalised
    assert history[-1]["step"] == 1500
    assert history[-1]["test_acc"] > 0.95


@pytest.mark.parametrize("freeze", [True, False])
def test_modular_addition_biases_stay_zero_only_when_frozen(tmp_path: Path, freeze: bool):
    from safetensors.torch import load_file

    train_recipe("modular-addition", tmp_path, progress=False, p=7, train_frac=0.5, steps=4, checkpoint_every=4,
                 freeze_biases=freeze)
    weights = load_file(tmp_path / "step4" / "model.safetensors")
    biases = [tensor for name, tensor in weights.items() if name.endswith(".bias")]
    assert biases
    assert all(bool((b == 0).all()) for b in biases) == freeze
