"""`circuits bench pythia` end to end at the tiny shape: the trained checkpoint is cached, the
step runs in a child process, and its figures are present and consistent (no timed goals)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from circuits.errors import CircuitsError


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    from circuits.bench import run_benchmark

    cache = tmp_path_factory.mktemp("bench-cache")
    return run_benchmark("pythia", size="tiny", cache=str(cache)), cache


def test_the_tiny_step_has_every_figure_and_its_phases_add_up(tiny_result):
    result, _ = tiny_result
    figures, step = result["figures"], result["step"]
    for name in ("time per step (wall)", "time per step (CPU)", "peak RSS of the step", "shard", "share: load",
                 "share: forward", "share: write", "share: circuit", "share: unmarked"):
        assert name in figures, name
    assert figures["time per step (wall)"]["goal"] is None  # goals are for the Pythia shapes only
    assert step["shard_bytes"] > 0 and step["peak_rss_mb"] >= step["start_rss_mb"] > 0
    marked = sum(step["phases_s"].values())
    assert marked <= step["wall_s"] * 1.01 and marked >= 0.8 * step["wall_s"]
    shares = sum(v["value"] for k, v in figures.items() if k.startswith("share: "))
    assert shares == pytest.approx(100, abs=1.5)
    assert result["eap_ig_library"] == {"given": False, "note": "EAP-IG library: not given (--eap-ig-python)"}


def test_the_brief_training_gives_a_gap_so_the_search_runs(tiny_result):
    result, _ = tiny_result
    gap = result["gap"]
    assert not gap["nil"] and math.isfinite(gap["faithfulness"]) and gap["n_edges"] >= 1
    assert gap["metric_clean"] > gap["metric_corrupted"]
    assert result["figures"]["faithful search ran"]["ok"] is True


def test_the_checkpoint_is_cached_and_reused(tiny_result):
    from circuits.bench.pythia import train_checkpoint

    result, cache = tiny_result
    assert result["model"]["training"]["cached"] is False
    run, made = train_checkpoint("tiny", result["model"]["checkpoint_step"], 0, "cpu", cache)
    assert made["cached"] is True and str(run) == result["model"]["run"]
    assert (run / "manifest.yaml").exists() and (run / f"step{made['recipe']['steps']}" / "config.json").exists()


def test_a_library_python_without_eap_is_reported_not_fatal(tiny_result):
    from circuits.bench import pythia

    result, _ = tiny_result
    library = pythia._eap_ig_library(sys.executable, Path(result["model"]["run"]),
                                     result["model"]["checkpoint_step"], "cpu", 4)
    assert "eap" in library["error"] and "driver failed" in library["error"]


def test_an_unknown_size_is_refused_by_name(tmp_path):
    from circuits.bench.pythia import bench_pythia

    with pytest.raises(CircuitsError, match=r"unknown --size '70m'; expected one of: tiny, 160m, 410m, 1b"):
        bench_pythia(size="70m", cache=str(tmp_path))


def test_the_pythia_options_are_refused_for_another_benchmark():
    from typer.testing import CliRunner

    from circuits import cli

    done = CliRunner().invoke(cli.app, ["bench", "extract", "--size", "410m", "--max-memory", "2GB"])
    assert done.exit_code != 0
    assert "--size, --max-memory apply to the pythia benchmark, not to 'extract'" in str(done.exception or done.output)
