"""The llc analysis (circuits.llc): off by default, settings recorded, the study's model untouched,
devinterp's estimator reproduced, estimates repeating within their error under another seed, the
task's own loss, the sweep switch and ``circuits llc-calibrate``. A tiny induction run (40 steps,
d_model 16) and few draws keep it cheap; the three that sample most are marked slow (journey tier:
all 23 took 10.6 min at load ~8 on 2 shared cores)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import circuits
from circuits.config import SweepConfig
from circuits.errors import CircuitsError
from circuits.llc import (
    LLCSettings,
    estimate,
    estimate_at,
    llc_analysis,
    llc_data,
    parse_settings,
    sampling_module,
)
from circuits.recipes import train_recipe
from circuits.sweep import builtin_analyses
from circuits.visit import VisitContext

pytest.importorskip("devinterp")

TINY = {"steps": 40, "checkpoint_every": 20, "d_model": 16, "n_heads": 2, "half_len": 8, "min_half": 4}
CHEAP = LLCSettings(chains=2, draws=20, burnin=5, batch_size=16, n_data=64)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llc-run")
    train_recipe("induction", out, progress=False, **TINY)
    return out


@pytest.fixture(scope="module")
def manifest(tiny_run: Path):
    return circuits.load_manifest(tiny_run)


def _ctx(manifest, step: int, settings: LLCSettings | dict) -> VisitContext:
    model = circuits.load(manifest, step)
    task = circuits.make_task("induction", model)
    options = {"llc": settings.to_dict() if isinstance(settings, LLCSettings) else settings}
    return VisitContext(model=model, task=task, manifest=manifest, step=step, options=options)


# ---------------------------------------------------------------- off by default, settings checked


def test_llc_is_off_by_default():
    assert SweepConfig().extra_analyses == ()
    assert "llc" not in [name for name, _ in builtin_analyses("eap-ig")]
    assert "llc" in [name for name, _ in builtin_analyses("none", ("llc",))]


def test_an_unknown_extra_analysis_is_refused_by_name():
    with pytest.raises(CircuitsError, match=r"--analyses 'lcc': expected one of llc"):
        SweepConfig(extra_analyses="lcc")


@pytest.mark.parametrize(("text", "match"), [
    ("lr=-1", r"--llc lr=-1.0: expected a step size above 0"),
    ("chains=1", r"--llc chains=1: expected a whole number >= 2 \(the standard error needs two chains\)"),
    ("chainz=3", r"--llc chainz: unknown setting; settings are lr, localization"),
    ("draws=ten", r"--llc draws='ten': expected a number"),
    ("lr", r"--llc 'lr': expected KEY=VALUE pairs"),
    ("data=web", r"--llc data='web': expected one of auto, training, task"),
])
def test_a_wrong_setting_is_refused_by_name(text: str, match: str):
    with pytest.raises(CircuitsError, match=match):
        parse_settings(text)


def test_settings_parse_over_the_defaults():
    s = parse_settings("lr=2e-4, localization=300,draws=50")
    assert (s.lr, s.localization, s.draws, s.chains) == (2e-4, 300.0, 50, LLCSettings().chains)


def test_the_default_inverse_temperature_is_batch_over_log_batch():
    assert LLCSettings(batch_size=32).inverse_temperature == pytest.approx(32 / math.log(32))
    assert LLCSettings(nbeta=10.0).inverse_temperature == 10.0


# ---------------------------------------------------------------- the analysis


def test_the_studys_model_is_unchanged_by_the_llc_analysis(manifest):
    ctx = _ctx(manifest, 40, CHEAP)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    llc_analysis(ctx)
    after = ctx.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_analysis_leaves_the_global_random_state_as_it_found_it(manifest):
    ctx = _ctx(manifest, 20, CHEAP)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    llc_analysis(ctx)
    assert torch.equal(torch.rand(3), expected)


def test_settings_and_traces_are_recorded_in_the_result(manifest):
    settings = replace(CHEAP, lr=2e-4, localization=150.0, seed=3)
    out = llc_analysis(_ctx(manifest, 40, settings))
    for key in ("lr", "localization", "chains", "draws", "burnin", "batch_size", "n_data", "seed"):
        assert out[key] == getattr(settings, key), key
    assert out["nbeta"] == pytest.approx(settings.batch_size / math.log(settings.batch_size))
    assert out["data"] == 0  # training data of the built-in induction recipe
    assert np.shape(out["loss_trace"]) == (settings.chains, settings.burnin + settings.draws)
    assert np.shape(out["llc_per_chain"]) == (settings.chains,)
    per_chain = np.asarray(out["llc_per_chain"])
    assert out["llc_mean"] == pytest.approx(per_chain.mean())
    assert out["llc_se"] == pytest.approx(per_chain.std(ddof=1) / math.sqrt(settings.chains))


def test_llc_is_nbeta_times_the_mean_rise_of_the_trace_after_burnin(manifest):
    e = estimate_at(circuits.load(manifest, 40), manifest, None, 40, CHEAP)
    expected = CHEAP.inverse_temperature * (e.loss_trace[:, CHEAP.burnin:].mean(1) - e.init_loss)
    assert np.allclose(e.llc_per_chain, expected)


def test_without_burnin_the_estimate_is_devinterps_own(manifest):
    # devinterp's compute_llc averages every SGLD step; with no burn-in ours is the same number
    e = estimate_at(circuits.load(manifest, 40), manifest, None, 40, replace(CHEAP, burnin=0))
    assert e.llc_mean == pytest.approx(e.devinterp_llc_mean, rel=1e-5)


@pytest.mark.slow  # minutes on a loaded 2-core machine: the journey tier
def test_estimates_repeat_within_their_error_under_another_seed(manifest):
    settings = replace(CHEAP, chains=3, draws=30, n_data=LLCSettings().n_data)
    for step in (0, 20, 40):
        model = circuits.load(manifest, step)
        a = estimate_at(model, manifest, None, step, settings)
        b = estimate_at(model, manifest, None, step, replace(settings, seed=1))
        assert a.llc_mean != b.llc_mean  # another seed: other noise and other batches
        assert abs(a.llc_mean - b.llc_mean) <= 3 * math.hypot(a.llc_se, b.llc_se), step


def test_the_same_seed_gives_the_same_estimate(manifest):
    model = circuits.load(manifest, 20)
    a, b = (estimate_at(model, manifest, None, 20, CHEAP) for _ in range(2))
    assert np.array_equal(a.loss_trace, b.loss_trace)


def test_task_data_samples_the_tasks_own_loss(manifest):
    from circuits.tasks import answer_logits, loss_at_answers

    model = circuits.load(manifest, 40)
    task = circuits.make_task("induction", model)
    settings = replace(CHEAP, data="task", n_data=64, batch_size=16)
    data = llc_data(manifest, task, settings)
    e = estimate(sampling_module(model, manifest, 40), data, settings)
    assert e.source == "task"
    rows = data.input_ids[:, 0]  # every drawn row is seen once by the loss at w* (64 = 4 batches of 16)
    sub = replace(task, clean=task.clean[rows], corrupted=task.corrupted[rows], answer_pos=task.answer_pos[rows],
                  correct=task.correct[rows], wrong=None)
    with torch.no_grad():
        expected = float(loss_at_answers(answer_logits(model(sub.clean), sub).float(), sub).mean())
    assert e.init_loss == pytest.approx(expected, rel=1e-4)


def test_training_data_is_refused_for_a_run_whose_data_is_not_known(manifest):
    hub = circuits.load_manifest("pythia-70m-deduped")
    with pytest.raises(CircuitsError, match=r"--llc data=training: pythia-70m-deduped is not a built-in induction run"):
        llc_data(hub, None, replace(CHEAP, data="training"))


# ---------------------------------------------------------------- the sweep and the CLI


@pytest.mark.slow  # minutes on a loaded 2-core machine: the journey tier
def test_a_sweep_with_llc_stores_the_curve_and_its_settings(manifest, tmp_path: Path):
    from circuits.sweep import sweep
    from circuits.tracking import track

    study = sweep(manifest, "induction", tmp_path / "study", steps="0,20,40", extra_analyses=("llc",),
                  options={"llc": "chains=2,draws=10,burnin=2,batch_size=16,n_data=64"}, progress=False)
    assert np.asarray(study.array("llc/llc_mean")).shape == (3,)
    assert np.asarray(study.array("llc/loss_trace")).shape == (3, 2, 12)
    recorded = json.loads((tmp_path / "study" / "study.json").read_text())["options"]["llc"]
    assert recorded == replace(LLCSettings(), chains=2, draws=10, burnin=2, batch_size=16, n_data=64).to_dict()
    tracking = track(study)
    assert np.array_equal(tracking.curves["llc"], np.asarray(study.array("llc/llc_mean")))
    assert tracking.llc_stages is not None


def test_llc_settings_without_the_analysis_are_refused(tiny_run: Path, tmp_path: Path):
    from circuits import cli

    result = CliRunner().invoke(cli.app, ["sweep", str(tiny_run), "--task", "induction", "--out",
                                          str(tmp_path / "s"), "--llc", "draws=10"])
    assert result.exit_code != 0
    assert "--llc sets the llc analysis's settings: add --analyses llc" in str(result.exception) + result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # minutes on a loaded 2-core machine: the journey tier
def test_llc_calibrate_prints_the_rule_and_writes_the_traces(tiny_run: Path, tmp_path: Path):
    from circuits import cli

    args = ["llc-calibrate", str(tiny_run), "--step", "40", "--lrs", "1e-4,1e-3", "--localizations", "100",
            "--llc", "chains=2,draws=20,burnin=5,batch_size=16,n_data=64", "--out", str(tmp_path / "cal")]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "rule: healthy = every trace finite" in result.output
    record = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert [(r["lr"], r["localization"]) for r in record["rows"]] == [(1e-4, 100.0), (1e-3, 100.0)]
    assert np.shape(record["traces"]["lr=0.001,localization=100"]) == (2, 25)
    assert (tmp_path / "cal" / "traces.html").is_file()


def test_llc_calibrate_never_overwrites_a_calibration(tiny_run: Path, tmp_path: Path):
    from circuits import cli

    (tmp_path / "calibration.json").write_text("{}")
    result = CliRunner().invoke(cli.app, ["llc-calibrate", str(tiny_run), "--step", "40", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "already holds a calibration" in str(result.exception) + result.output
    assert (tmp_path / "calibration.json").read_text() == "{}"
