"""The sweep on the built-in induction run: parity with a fresh run, resume, kills, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the zstd codec for h5py
import numpy as np
import pytest
import torch
from study_helpers import datasets

import circuits
from circuits.errors import CircuitsError
from circuits.sweep import sweep

STEPS = "0,300,600"
N_EXAMPLES = 8


@pytest.fixture(scope="module")
def study_f16(induction_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "study-f16"
    sweep(induction_run, "induction", out, steps=STEPS, n_examples=N_EXAMPLES, batch_size=3, progress=False)
    return out


def fresh(induction_run: Path, study: circuits.store.Study, step: int, names: list[str]):
    model = circuits.load(induction_run, step)
    with torch.no_grad():
        logits, cache = model.run_with_cache(study.task.clean, names_filter=names)
        corrupted = model(study.task.corrupted)
    return logits, cache, corrupted


def test_patterns_and_activations_equal_a_fresh_run_within_float16(induction_run, study_f16):
    study = circuits.open_study(study_f16)
    assert study.steps == [0, 300, 600]
    names = ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post",
             "blocks.0.attn.hook_z"]
    _, cache, _ = fresh(induction_run, study, 300, names)
    for layer in range(study.n_layers):
        for head in range(study.n_heads):
            for example in (0, N_EXAMPLES - 1):
                want = cache[f"blocks.{layer}.attn.hook_pattern"][example, head].numpy()
                np.testing.assert_allclose(study.pattern(300, layer, head, example), want, atol=5e-4, rtol=0)
    for hook in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_z"):
        want = cache[hook].numpy()
        np.testing.assert_allclose(study.activation(300, hook), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_float32_study_is_exact(induction_run, tmp_path):
    study = sweep(induction_run, "induction", tmp_path / "f32", steps="600", n_examples=4, dtype="float32",
                  hooks="blocks.*.hook_resid_post", progress=False)
    _, cache, _ = fresh(induction_run, study, 600, ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post"])
    np.testing.assert_array_equal(study.pattern(600, 0, 2, 3), cache["blocks.0.attn.hook_pattern"][3, 2].numpy())
    np.testing.assert_array_equal(study.activation(600, "blocks.1.hook_resid_post"),
                                  cache["blocks.1.hook_resid_post"].numpy())


def test_metric_and_loss_over_steps_equal_a_fresh_computation(induction_run, study_f16):
    from circuits.tasks import answer_logits, metric_per_example

    study = circuits.open_study(study_f16)
    want_metric, want_corrupted, want_loss = [], [], []
    for step in study.steps:
        logits, _, corrupted = fresh(induction_run, study, step, [])
        want_metric.append(metric_per_example(logits, study.task).mean().item())
        want_corrupted.append(metric_per_example(corrupted, study.task).mean().item())
        at = answer_logits(logits, study.task).log_softmax(-1)
        want_loss.append(-at.gather(-1, study.task.correct[..., None]).mean().item())
    np.testing.assert_allclose(study.metric(), want_metric, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(study.metric_corrupted(), want_corrupted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(study.loss(), want_loss, rtol=1e-5, atol=1e-5)
    assert study.metric()[-1] > study.metric()[0] + 5  # the induction phase change is visible


def test_resume_skips_complete_shards(induction_run, study_f16):
    shards = sorted((study_f16 / "shards").glob("step*.h5"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    sweep(induction_run, "induction", study_f16, steps=STEPS, n_examples=N_EXAMPLES, batch_size=3, progress=False)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((study_f16 / "shards").glob("step*.h5"))}
    assert after == before


def test_study_json_records_every_sweeps_selected_steps(induction_run, tmp_path):
    out = tmp_path / "study"
    sweep(induction_run, "induction", out, steps="0,300", n_examples=4, hooks="none", progress=False)
    assert json.loads((out / "study.json").read_text())["steps"] == [0, 300]
    sweep(induction_run, "induction", out, steps="300,600", n_examples=4, hooks="none", progress=False)
    assert json.loads((out / "study.json").read_text())["steps"] == [0, 300, 600]


def test_killed_sweep_completes_with_the_same_contents(induction_run, study_f16, tmp_path):
    out = tmp_path / "killed"
    code = (f"from circuits.sweep import sweep; sweep({str(induction_run)!r}, 'induction', {str(out)!r}, "
            f"steps={STEPS!r}, n_examples={N_EXAMPLES}, batch_size=3, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 240
        while not list((out / "shards").glob("step*.h5")):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    landed = sorted(p.name for p in (out / "shards").glob("step*.h5"))
    assert 1 <= len(landed) < 3, "kill it mid-sweep"
    study = sweep(induction_run, "induction", out, steps=STEPS, n_examples=N_EXAMPLES, batch_size=3, progress=False)
    assert study.steps == [0, 300, 600]
    assert not [p for p in (out / "shards").iterdir() if ".tmp-" in p.name]
    for step in study.steps:
        name = f"shards/step{step:08d}.h5"
        got, want = datasets(out / name), datasets(study_f16 / name)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}:{key}")
    np.testing.assert_array_equal(study.metric(), circuits.open_study(study_f16).metric())


def test_incomplete_shard_is_ignored_and_redone(induction_run, study_f16, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(study_f16, out)
    unmarked = out / "shards" / "step00000050.h5"
    with h5py.File(unmarked, "w") as f:  # looks landed, but no completion mark: not data
        f.create_dataset("patterns", data=np.zeros((N_EXAMPLES, 2, 4, 33 * 34 // 2), np.float16))
    (out / "shards" / ".step00000060.h5.tmp-999999999").write_bytes(b"partial")
    study = circuits.open_study(out)
    assert study.steps == [0, 300, 600]
    with pytest.raises(CircuitsError, match="step00000050.h5: incomplete shard"):
        study.pattern(50, 0, 0, 0)
    with pytest.warns(UserWarning, match="step00000050.h5: not a complete shard; moved to step00000050.h5.corrupt"):
        study = sweep(induction_run, "induction", out, steps="50,300", n_examples=N_EXAMPLES, batch_size=3,
                      progress=False)
    assert study.steps == [0, 50, 300, 600]
    assert study.pattern(50, 1, 1, 1).sum() == pytest.approx(33, abs=0.05)  # rows of a real pattern sum to 1
    assert not (out / "shards" / ".step00000060.h5.tmp-999999999").exists()


def test_a_model_whose_attention_is_not_causal_is_refused(induction_run, tmp_path):
    import json

    import yaml

    run = tmp_path / "bidirectional"
    manifest = yaml.safe_load((induction_run / "manifest.yaml").read_text())
    first = manifest["steps"][0]
    shutil.copytree(induction_run / f"step{first}", run / f"step{first}")
    config = json.loads((run / f"step{first}" / "config.json").read_text())
    config["tl_config"]["attention_dir"] = "bidirectional"
    (run / f"step{first}" / "config.json").write_text(json.dumps(config))
    (run / "manifest.yaml").write_text(yaml.safe_dump(manifest | {"steps": [first]}))
    with pytest.raises(CircuitsError, match="attention is bidirectional, the sweep caches causal language models only"):
        sweep(run, "induction", tmp_path / "study", n_examples=4, progress=False)
    assert not (tmp_path / "study" / "study.json").exists()


def test_sweep_into_a_study_of_other_prompts_or_task_is_refused(induction_run, study_f16):
    with pytest.raises(CircuitsError, match=r"another prompts \(hash\)"):
        sweep(induction_run, "induction", study_f16, steps="50", n_examples=N_EXAMPLES + 1, progress=False)
    with pytest.raises(CircuitsError, match="another task"):
        sweep(induction_run, "modular-addition", study_f16, steps="50", progress=False)
    with pytest.raises(CircuitsError, match="another dtype"):
        sweep(induction_run, "induction", study_f16, steps="50", n_examples=N_EXAMPLES, dtype="float32",
              progress=False)
    assert circuits.open_study(study_f16).steps == [0, 300, 600]


def test_unknown_hook_is_refused_with_valid_names(induction_run, tmp_path):
    with pytest.raises(CircuitsError, match=r"'blocks.0.hook_nope' matches no hook.*blocks.0.hook_resid_post"):
        sweep(induction_run, "induction", tmp_path / "s", steps="0", hooks="blocks.0.hook_nope", progress=False)


def test_prompts_outside_the_vocabulary_are_refused(induction_run, tmp_path):
    from circuits.tasks import induction_task

    task = induction_task(4, half_len=8, vocab=500)
    with pytest.raises(CircuitsError, match="outside the model's vocabulary"):
        sweep(induction_run, task, tmp_path / "s", steps="0", progress=False)
    assert not list((tmp_path / "s" / "shards").glob("*.h5"))


def test_unwritable_output_is_refused(induction_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CircuitsError, match="cannot write the study there"):
        sweep(induction_run, "induction", blocker / "study", steps="0", progress=False)


def test_reads_of_what_does_not_exist_are_refused(study_f16):
    study = circuits.open_study(study_f16)
    with pytest.raises(CircuitsError, match="step 7 is not in the study"):
        study.pattern(7, 0, 0, 0)
    with pytest.raises(CircuitsError, match=r"layer 2 does not exist \(valid: 0..1\)"):
        study.pattern(0, 2, 0, 0)
    with pytest.raises(CircuitsError, match="head 4 does not exist"):
        study.pattern(0, 0, 4, 0)
    with pytest.raises(CircuitsError, match="example 8 does not exist"):
        study.pattern(0, 0, 0, 8)
    with pytest.raises(CircuitsError, match="hook 'blocks.0.hook_resid_pre' was not cached"):
        study.activation(0, "blocks.0.hook_resid_pre")


def test_truncated_shard_names_its_file_and_spares_the_others(study_f16, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(study_f16, out)
    bad = out / "shards" / "step00000300.h5"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 3)
    study = circuits.open_study(out)
    assert study.steps == [0, 600]
    with pytest.raises(CircuitsError, match="step00000300.h5: corrupted or truncated shard"):
        study.pattern(300, 0, 0, 0)
    assert study.pattern(600, 1, 0, 0).shape == (33, 33)
    assert (out / "shards" / "step00000600.h5").read_bytes() == (study_f16 / "shards" / "step00000600.h5").read_bytes()


def test_cli_sweep_error_is_one_line_and_exit_2(induction_run, tmp_path, monkeypatch, capsys):
    from circuits.cli import main

    monkeypatch.setattr(sys, "argv", ["circuits", "sweep", str(induction_run), "--task", "induction",
                                      "--out", str(tmp_path / "s"), "--steps", "0", "--hooks", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: hook filter: 'nope' matches no hook") and "\n" not in err


def test_study_task_and_provenance_round_trip(induction_run, study_f16):
    study = circuits.open_study(study_f16)
    task = study.task
    assert task.n_examples == N_EXAMPLES and task.prompt_hash() == study.provenance["task"]["prompt_hash"]
    np.testing.assert_array_equal(study.tokens(2), task.clean[2].numpy())
    from circuits.recipes.induction import DEFAULTS

    seq_len = 2 * DEFAULTS["half_len"] + 1  # BOS, then the half twice
    assert study.seq_len == seq_len and study.n_layers == DEFAULTS["n_layers"] and study.n_heads == DEFAULTS["n_heads"]
    shard = study.shard_provenance(300)
    tokens_per_step = DEFAULTS["batch_size"] * seq_len
    assert shard["step"] == 300 and shard["tokens_seen"] == 300 * tokens_per_step and shard["dtype"] == "float16"
    assert set(shard["versions"]) >= {"circuits", "torch", "transformer_lens", "h5py"}
    assert shard["options"]["method"] == "none" and shard["hooks"] == study.hooks
    assert "induction-2l" in shard["manifest"] and shard["task"]["prompt_hash"] == task.prompt_hash()
    assert os.path.exists(study_f16 / "index.h5")


def test_analysis_results_land_under_their_name(induction_run, tmp_path):
    def probe(ctx):
        assert ctx.step == 600 and ctx.cache is not None  # one batch: the clean cache is shared
        return {"n_heads": np.arange(ctx.model.cfg.n_heads), "seen": True, "mean": 0.5}

    study = sweep(induction_run, "induction", tmp_path / "s", steps="600", n_examples=4, hooks="none",
                  analyses=[("probe", probe)], progress=False)
    np.testing.assert_array_equal(study.array("probe/n_heads"), [[0, 1, 2, 3]])
    assert study.array_at(600, "probe/seen") and study.array("probe/mean")[0] == 0.5
    assert study.keys("probe") == ["probe/mean", "probe/n_heads", "probe/seen"]
    assert study.hooks == [] and not study.keys("activations")


def test_bench_extract_reports_its_figures_on_a_small_batch():
    from circuits.bench import run_benchmark

    result = run_benchmark("extract", batch=4, seq=16, n_batches=2, rounds=1)
    figures = result["figures"]
    assert {"extract_over_forward", "stored_over_raw_f32", "read_one_head_ms"} <= set(figures)
    assert figures["stored_over_raw_f32"]["value"] < 0.6 and figures["read_one_head_ms"]["value"] > 0
    assert result["machine"]["cores"] >= 1
