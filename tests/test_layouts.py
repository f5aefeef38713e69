"""Run layouts: `circuits manifest` detects how a folder holds its checkpoints; the manifest's
``local.layout`` and ``tokens`` map; one-line refusals for no checkpoints, duplicates, mixed layouts.

The folders here are fakes (empty folders and files, hand-written ``trainer_state.json``):
detection reads names and JSON only. Loading real weights through each layout is in
``test_convert.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from study_helpers import run_cli

from circuits.errors import CircuitsError
from circuits.folder_manifest import manifest_from_folder
from circuits.layouts import detect, find_checkpoint
from circuits.manifest import builtin_manifests, load_manifest, parse_manifest

LOCAL = {"name": "r", "source": "local", "local": {"path": "."}, "steps": [0, 10, 20]}


def make(root: Path, *names: str) -> Path:
    """Create ``names`` under ``root``: a trailing '/' makes a folder, anything else an empty file."""
    for name in names:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return root


def trainer_state(folder: Path, global_step: int, tokens: int = 0, log: list[dict] | None = None) -> None:
    """A ``trainer_state.json`` as transformers' TrainerState.save_to_json writes it (the fields read)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"global_step": global_step, "num_input_tokens_seen": tokens, "log_history": log or []}
    (folder / "trainer_state.json").write_text(json.dumps(state))




def one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------- detection


def test_step_folders_are_detected_with_their_steps(tmp_path):
    found = detect(make(tmp_path, "step0/", "step10/", "step200/", "notes.txt"))
    assert (found.layout, found.pattern, found.steps) == ("step-folders", "step{step}", [0, 10, 200])


def test_hugging_face_trainer_folders_are_detected(tmp_path):
    found = detect(make(tmp_path, "checkpoint-5/", "checkpoint-10/", "runs/"))
    assert (found.layout, found.pattern, found.steps) == ("hf-trainer", "checkpoint-{step}", [5, 10])


def test_weight_files_named_with_their_step_are_detected(tmp_path):
    found = detect(make(tmp_path, "model_5.safetensors", "model_50.safetensors", "config.json"))
    assert (found.layout, found.pattern, found.steps) == ("files", "model_{step}.safetensors", [5, 50])


def test_a_name_with_underscores_takes_its_last_number_as_the_step(tmp_path):
    found = detect(make(tmp_path, "my_run_v2_100.pt", "my_run_v2_200.pt"))
    assert (found.pattern, found.steps) == ("my_run_v2_{step}.pt", [100, 200])


def test_a_user_pattern_matches_folders(tmp_path):
    found = detect(make(tmp_path, "ckpt-1/", "ckpt-30/", "step5/"), pattern="ckpt-{step}")
    assert (found.layout, found.steps) == ("pattern", [1, 30])  # step5/ is not looked at


def test_a_user_pattern_matches_files_in_a_subfolder(tmp_path):
    found = detect(make(tmp_path, "weights/ep3.safetensors", "weights/ep7.safetensors", "weights/ep7.json"),
                   pattern="weights/ep{step}.safetensors")
    assert found.steps == [3, 7] and found.paths[7] == tmp_path / "weights" / "ep7.safetensors"


def test_gaps_between_steps_are_fine(tmp_path):
    assert detect(make(tmp_path, "step0/", "step7/", "step1000/")).steps == [0, 7, 1000]


def test_a_zero_padded_name_is_read_as_its_number_and_found_by_it(tmp_path):
    make(tmp_path, "ckpt-0010/", "ckpt-0020/")
    assert detect(tmp_path, pattern="ckpt-{step}").steps == [10, 20]
    assert find_checkpoint(tmp_path, "ckpt-{step}", 10) == tmp_path / "ckpt-0010"


def test_hidden_folders_are_not_checkpoints(tmp_path):
    """A step folder being written (.step30.tmp) and the conversion cache are never counted."""
    found = detect(make(tmp_path, "step10/", ".step30.x1/", ".circuits-converted/step10/"))
    assert found.steps == [10]


# ---------------------------------------------------------------- refusals


def test_a_folder_with_no_checkpoints_is_refused_naming_what_was_looked_for(tmp_path):
    with pytest.raises(CircuitsError, match=r"no checkpoints found \(looked for step\{N\}/, checkpoint-\{N\}/.*"
                                            r"pass --pattern"):
        detect(make(tmp_path, "README.md", "data/"))


def test_a_lone_nanogpt_checkpoint_is_refused_with_how_to_keep_one_per_step(tmp_path):
    with pytest.raises(CircuitsError, match=r"ckpt\.pt is one nanoGPT checkpoint: keep one per step as "
                                            r"step\{N\}/ckpt\.pt or ckpt_\{N\}\.pt"):
        detect(make(tmp_path, "ckpt.pt"))


def test_two_folders_for_one_step_are_refused_naming_both(tmp_path):
    with pytest.raises(CircuitsError, match=r"two checkpoints for step 10: step010 and step10"):
        detect(make(tmp_path, "step0/", "step10/", "step010/"))


def test_loading_refuses_a_step_with_two_folders_too(tmp_path):
    with pytest.raises(CircuitsError, match=r"two checkpoints for step 10: step010 and step10"):
        find_checkpoint(make(tmp_path, "step10/", "step010/"), "step{step}", 10)


def test_mixed_layouts_are_refused_naming_one_example_of_each(tmp_path):
    make(tmp_path, "step10/", "step20/", "checkpoint-30/")
    with pytest.raises(CircuitsError, match=r"mixed checkpoint layouts, step-folders \(step10\) and "
                                            r"hf-trainer \(checkpoint-30\); pass --pattern"):
        detect(tmp_path)


def test_a_pattern_chooses_one_layout_among_mixed_ones(tmp_path):
    make(tmp_path, "step10/", "checkpoint-30/", "checkpoint-40/")
    assert detect(tmp_path, pattern="checkpoint-{step}").steps == [30, 40]


@pytest.mark.parametrize(("pattern", "message"), [
    ("ckpt", r"placeholder \{step\} exactly once"),
    ("{step}-{step}", r"placeholder \{step\} exactly once"),
    ("../elsewhere/{step}", r"relative path inside the run's folder"),
    ("/abs/{step}", r"relative path inside the run's folder"),
    ("ckpt-{step}-*", r"no wildcards"),
    ("ckpt-{step:04d}", r"placeholder \{step\} exactly once"),
])
def test_a_bad_pattern_is_refused_with_what_a_pattern_must_be(tmp_path, pattern, message):
    with pytest.raises(CircuitsError, match=r"--pattern .*" + message):
        detect(tmp_path, pattern=pattern)


def test_a_pattern_matching_nothing_is_refused_naming_it(tmp_path):
    with pytest.raises(CircuitsError, match=r"no checkpoints found matching --pattern 'ckpt-\{step\}'"):
        detect(make(tmp_path, "step1/"), pattern="ckpt-{step}")


# ---------------------------------------------------------------- tokens seen


def test_trainer_tokens_come_from_each_checkpoints_own_state(tmp_path):
    for step in (10, 20, 30):
        trainer_state(tmp_path / f"checkpoint-{step}", step, tokens=step * 96 + 7)  # uneven: packed batches
    manifest = manifest_from_folder(tmp_path)
    assert manifest.tokens == {10: 967, 20: 1927, 30: 2887} and manifest.tokens_per_step is None
    assert [manifest.tokens_seen(s) for s in (10, 30)] == [967, 2887]


def test_trainer_tokens_come_from_the_last_states_log_when_earlier_states_lack_them(tmp_path):
    log = [{"step": 10, "loss": 3.0, "num_input_tokens_seen": 640}, {"step": 20, "num_input_tokens_seen": 1280}]
    trainer_state(tmp_path / "checkpoint-10", 10)
    trainer_state(tmp_path / "checkpoint-20", 20, tokens=1280, log=log)
    assert manifest_from_folder(tmp_path).tokens == {10: 640, 20: 1280}


def test_a_trainer_run_that_did_not_count_tokens_asks_for_tokens_per_step(tmp_path):
    """TrainerState's num_input_tokens_seen stays 0 unless include_num_input_tokens_seen is on."""
    for step in (10, 20):
        trainer_state(tmp_path / f"checkpoint-{step}", step)
    with pytest.raises(CircuitsError, match=r"trainer_state\.json has no num_input_tokens_seen for every "
                                            r"checkpoint .*; pass --tokens-per-step T"):
        manifest_from_folder(tmp_path)
    assert manifest_from_folder(tmp_path, tokens_per_step=512).tokens_per_step == 512


def test_a_trainer_state_whose_global_step_disagrees_with_its_folder_is_refused(tmp_path):
    trainer_state(tmp_path / "checkpoint-20", 19, tokens=100)
    with pytest.raises(CircuitsError, match=r"checkpoint-20/trainer_state\.json: global_step is 19 in the folder of step 20"):
        manifest_from_folder(tmp_path)


def test_a_folder_without_a_token_count_asks_for_tokens_per_step(tmp_path):
    with pytest.raises(CircuitsError, match=r"do not say how many tokens each step saw; pass --tokens-per-step"):
        manifest_from_folder(make(tmp_path, "model_1.safetensors", "config.json"))


def test_native_step_folders_give_their_recorded_tokens(tmp_path):
    for step in (0, 4):
        make(tmp_path, f"step{step}/")
        (tmp_path / f"step{step}" / "config.json").write_text(json.dumps({"format": "circuits-native/1",
                                                                           "tokens_seen": step * 33}))
    manifest = manifest_from_folder(tmp_path)
    assert manifest.tokens == {0: 0, 4: 132} and manifest.architecture == "TransformerLensNative"


# ---------------------------------------------------------------- schema


def test_a_tokens_map_gives_tokens_seen_per_step():
    manifest = parse_manifest({**LOCAL, "tokens": {0: 0, 10: 1000, 20: 1500}})
    assert [manifest.tokens_seen(s) for s in (0, 10, 20)] == [0, 1000, 1500]


def test_a_tokens_map_must_cover_every_step():
    with pytest.raises(CircuitsError, match=r"field 'tokens' has no value for 1 of the steps \(first: \[20\]\)"):
        parse_manifest({**LOCAL, "tokens": {0: 0, 10: 1000}})


def test_a_tokens_map_may_not_name_steps_the_run_lacks():
    with pytest.raises(CircuitsError, match=r"field 'tokens' names steps that are not in 'steps' \(first: \[30\]\)"):
        parse_manifest({**LOCAL, "tokens": {0: 0, 10: 1, 20: 2, 30: 3}})


def test_tokens_per_step_and_a_tokens_map_together_are_refused():
    with pytest.raises(CircuitsError, match=r"give exactly one of tokens_per_step .* not both"):
        parse_manifest({**LOCAL, "tokens_per_step": 5, "tokens": {0: 0, 10: 1, 20: 2}})


def test_a_files_layout_needs_its_pattern():
    with pytest.raises(CircuitsError, match=r"field 'local': layout files needs field 'pattern'"):
        parse_manifest({**LOCAL, "tokens_per_step": 1, "local": {"layout": "files"}})


def test_a_fixed_layout_takes_no_pattern():
    with pytest.raises(CircuitsError, match=r"'pattern' applies to the layouts files and pattern; layout "
                                            r"hf-trainer is always 'checkpoint-\{step\}'"):
        parse_manifest({**LOCAL, "tokens_per_step": 1, "local": {"layout": "hf-trainer", "pattern": "x{step}"}})


def test_an_unknown_layout_is_refused_naming_the_known_ones():
    with pytest.raises(CircuitsError, match=r"field 'local\.layout': .*'step-folders', 'hf-trainer', 'files' or 'pattern'"):
        parse_manifest({**LOCAL, "tokens_per_step": 1, "local": {"layout": "zip"}})


def test_a_pattern_reaching_outside_the_run_is_refused():
    with pytest.raises(CircuitsError, match=r"field 'local\.pattern': must be a relative path inside the run's folder"):
        parse_manifest({**LOCAL, "tokens_per_step": 1, "local": {"layout": "pattern", "pattern": "../x{step}"}})


def test_a_default_layout_manifest_writes_the_same_yaml_as_before_layouts_existed():
    """Studies compare the manifest's YAML on resume: the default layout adds nothing to it."""
    for path in builtin_manifests().values():
        data = yaml.safe_load(path.read_text())
        manifest = load_manifest(path)
        assert "layout" not in yaml.safe_load(manifest.to_yaml()).get("local", {})
        assert set(yaml.safe_load(manifest.to_yaml())) <= set(data) | {"description", "architecture"}


# ---------------------------------------------------------------- the command


def test_manifest_command_writes_the_folders_manifest_with_path_dot(monkeypatch, capsys, tmp_path):
    run = tmp_path / "my run"
    for step in (10, 20):
        trainer_state(run / f"checkpoint-{step}", step, tokens=step * 64)
    code, out, err = run_cli(monkeypatch, capsys, "manifest", str(run))
    assert code == 0, err
    manifest = load_manifest(run)
    assert manifest.name == "my-run" and manifest.local is not None
    assert (manifest.local.path, manifest.local.layout, manifest.steps) == (".", "hf-trainer", [10, 20])
    assert manifest.checkpoint_root == run.resolve()
    assert "2 checkpoints (steps 10 to 20, layout hf-trainer)" in out


def test_manifest_command_never_overwrites_without_force(monkeypatch, capsys, tmp_path):
    make(tmp_path, "step1/", "step2/")
    (tmp_path / "manifest.yaml").write_text("hand-written: keep me\n")
    code, _, err = run_cli(monkeypatch, capsys, "manifest", str(tmp_path), "--tokens-per-step", "8")
    one_line_error(code, err, r"manifest\.yaml: exists; pass --force to replace it")
    assert (tmp_path / "manifest.yaml").read_text() == "hand-written: keep me\n"
    code, _, err = run_cli(monkeypatch, capsys, "manifest", str(tmp_path), "--tokens-per-step", "8", "--force")
    assert code == 0, err
    assert load_manifest(tmp_path).tokens_per_step == 8


def test_manifest_command_out_above_the_folder_names_the_folder_by_its_relative_path(monkeypatch, capsys, tmp_path):
    make(tmp_path / "runs" / "a", "step1/", "step3/")
    out = tmp_path / "manifests" / "a.yaml"
    code, _, err = run_cli(monkeypatch, capsys, "manifest", str(tmp_path / "runs" / "a"), "--out",
                           str(tmp_path / "a.yaml"), "--tokens-per-step", "4", "--name", "run-a")
    assert code == 0, err
    manifest = load_manifest(tmp_path / "a.yaml")
    assert manifest.local is not None and manifest.local.path == "runs/a" and manifest.name == "run-a"
    code, _, err = run_cli(monkeypatch, capsys, "manifest", str(tmp_path / "runs" / "a"), "--out", str(out),
                           "--tokens-per-step", "4")
    one_line_error(code, err, r"--out .*a\.yaml: must lie in .* or a folder above it")
    assert not out.exists()


def test_manifest_command_errors_are_one_line_and_write_nothing(monkeypatch, capsys, tmp_path):
    make(tmp_path, "step10/", "step010/")
    code, _, err = run_cli(monkeypatch, capsys, "manifest", str(tmp_path), "--tokens-per-step", "1")
    one_line_error(code, err, r"two checkpoints for step 10: step010 and step10")
    assert not (tmp_path / "manifest.yaml").exists()


def test_manifest_command_needs_a_folder_or_a_hub_repo(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "manifest")
    one_line_error(code, err, r"give a run FOLDER or --hub REPO")


def test_manifest_command_refuses_hub_options_for_a_folder(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "manifest", str(make(tmp_path, "step1/")), "--revisions", "r.txt")
    one_line_error(code, err, r"--revisions and --architecture apply to --hub, not to a run folder")
