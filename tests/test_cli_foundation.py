"""The ``circuits`` command line: train/demo, bad input (one line, exit 2, nothing lost), --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from study_helpers import run_cli

from circuits import cli
from circuits.manifest import load_manifest
from circuits.recipes.induction import DEFAULTS as INDUCTION
from circuits.steps import log_then_linear

REPO = Path(__file__).resolve().parents[1]




def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    import re

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_unknown_recipe_is_one_line_and_creates_nothing(monkeypatch, capsys, tmp_path: Path):
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "train", "transformer-xl", "--out", str(out))
    assert_one_line_error(code, err, r"unknown recipe 'transformer-xl'; expected one of: induction, modular-addition")
    assert not out.exists()


def test_out_folder_holding_another_run_is_refused_and_untouched(monkeypatch, capsys, tmp_path: Path):
    out = tmp_path / "other"
    out.mkdir()
    other = load_manifest("modadd-p113")
    (out / "manifest.yaml").write_text(other.model_copy(update={"local": other.local.model_copy(update={"path": "."})}).to_yaml())
    (out / "step0").mkdir()
    (out / "step0" / "model.safetensors").write_bytes(b"weights of another run")
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    code, _, err = run_cli(monkeypatch, capsys, "train", "induction", "--out", str(out),
                           "--steps", "40", "--checkpoint-every", "20")
    assert_one_line_error(code, err, r"holds another run \(modadd-p113, recipe modular-addition, seed 0\); choose an empty --out folder")
    assert snapshot(out) == before


def test_non_empty_out_folder_without_manifest_is_refused_and_untouched(monkeypatch, capsys, tmp_path: Path):
    (tmp_path / "thesis.tex").write_text("do not lose this")
    before = snapshot(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "train", "induction", "--out", str(tmp_path), "--steps", "40")
    assert_one_line_error(code, err, r"folder is not empty and holds no run manifest")
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_is_refused_and_untouched(monkeypatch, capsys, tmp_path: Path):
    target = tmp_path / "run"
    target.write_text("a file")
    code, _, err = run_cli(monkeypatch, capsys, "train", "induction", "--out", str(target))
    assert_one_line_error(code, err, r"exists and is not a folder")
    assert target.read_text() == "a file"


def test_modular_addition_options_are_refused_for_induction(monkeypatch, capsys, tmp_path: Path):
    code, _, err = run_cli(monkeypatch, capsys, "train", "induction", "--out", str(tmp_path / "r"), "--p", "31")
    assert_one_line_error(code, err, r"--p, --train-frac and --freeze-biases apply to modular-addition, not to 'induction'")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["modular-addition", "--train-frac", "1.5"], r"--train-frac 1\.5: expected a share strictly between 0 and 1"),
        (["modular-addition", "--train-frac", "0"], r"--train-frac 0\.0: expected a share strictly between 0 and 1"),
        (["modular-addition", "--p", "1"], r"--p 1: the modulus must be at least 2"),
        (["induction", "--steps", "0"], r"schedule: total \(0\) and linear_every \(25\) must be >= 1"),
        (["induction", "--checkpoint-every", "0"], r"schedule: total \(1000\) and linear_every \(0\) must be >= 1"),
    ],
    ids=["train-frac-above-1", "train-frac-0", "p-1", "steps-0", "checkpoint-every-0"],
)
def test_bad_training_option_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path: Path, args, pattern):
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "train", *args, "--out", str(out))
    assert_one_line_error(code, err, pattern)
    assert not out.exists()


def test_unknown_device_is_refused_before_training(monkeypatch, capsys, tmp_path: Path):
    code, _, err = run_cli(monkeypatch, capsys, "train", "induction", "--out", str(tmp_path / "r"), "--device", "tpu")
    assert_one_line_error(code, err, r"--device 'tpu': expected cpu, cuda or cuda:N")
    assert not (tmp_path / "r").exists()


def test_train_into_the_folder_of_the_same_finished_run_reprints_its_table(monkeypatch, capsys, induction_run: Path):
    before = {p: p.stat().st_mtime_ns for p in induction_run.rglob("*")}
    code, out, _ = run_cli(monkeypatch, capsys, "train", "induction", "--out", str(induction_run))
    assert code == 0
    schedule = log_then_linear(INDUCTION["steps"], INDUCTION["checkpoint_every"])  # the recipe's default schedule
    assert f"trained induction-2l: {len(schedule)} checkpoints" in out
    assert "repeated_loss" in out
    assert {p: p.stat().st_mtime_ns for p in induction_run.rglob("*")} == before


def test_checkpoint_table_lists_every_step_with_its_losses(capsys, induction_run: Path):
    # The table `circuits train` and `circuits demo` print after training.
    cli.print_history(induction_run)
    out = capsys.readouterr().out
    assert "repeated_loss" in out and "first_half_loss" in out
    table_steps = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 3]
    assert table_steps == [str(step) for step in load_manifest(induction_run).steps]


HEAVY = ("torch", "transformer_lens", "transformers", "h5py", "streamlit")


def test_help_answers_without_importing_heavy_libraries():
    # `python -X importtime` lists on stderr every module the child imported, one per line.
    command = [sys.executable, "-X", "importtime", "-m", "circuits", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "demo" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "circuits" in imported  # the listing is real
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_importing_the_cli_does_not_import_heavy_libraries():
    code = f"import sys, circuits.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
