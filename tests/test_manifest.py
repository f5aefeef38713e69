"""Manifests: the shipped files validate; bad files give one line naming the file and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuits.errors import CircuitsError
from circuits.manifest import (
    MANIFEST_DIR,
    Manifest,
    builtin_manifests,
    load_manifest,
    parse_manifest,
)
from circuits.recipes import induction, modular_addition
from circuits.steps import PYTHIA_STEPS, log_then_linear

PYTHIA_SIZES = ["70m", "160m", "410m", "1b"]
PYTHIA_NAMES = [f"pythia-{size}{suffix}" for size in PYTHIA_SIZES for suffix in ("", "-deduped")]

VALID_LOCAL = {
    "name": "my-run",
    "source": "local",
    "local": {"path": ".", "recipe": "induction", "seed": 0},
    "tokens_per_step": 2112,
    "steps": [0, 1, 2, 4],
}
VALID_HUB = {
    "name": "my-pythia",
    "source": "hub",
    "hub": {"repo": "EleutherAI/pythia-70m", "revision_format": "step{step}"},
    "tokens_per_step": 2_097_152,
    "steps": "pythia-154",
}


def write_yaml(tmp_path: Path, data, name: str = "bad-run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def without(data: dict, *keys: str) -> dict:
    out = copy.deepcopy(data)
    for key in keys:
        out.pop(key)
    return out


def with_value(data: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


# --- the shipped manifests -------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(MANIFEST_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_manifest_validates(path: Path):
    manifest = load_manifest(path)
    assert manifest.name == path.stem
    assert manifest.steps == sorted(set(manifest.steps))


def test_builtin_manifests_include_the_pythia_suite_and_local_runs():
    assert set(PYTHIA_NAMES) | {"induction-2l", "modadd-p113"} <= set(builtin_manifests())


@pytest.mark.parametrize("name", PYTHIA_NAMES)
def test_pythia_manifest_has_154_steps_and_tokens_per_step(name: str):
    manifest = load_manifest(name)
    assert manifest.source == "hub"
    assert manifest.hub.repo == f"EleutherAI/{name}"
    assert len(manifest.steps) == 154
    assert manifest.steps == PYTHIA_STEPS
    assert manifest.tokens_per_step == 2_097_152
    assert manifest.hub.revision(143000) == "step143000"
    assert manifest.tokens_seen(1000) == 1000 * 2_097_152


def test_pythia_schedule_is_log_spaced_then_every_thousand():
    assert PYTHIA_STEPS[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert PYTHIA_STEPS[11:] == list(range(1000, 143001, 1000))


@pytest.mark.parametrize(
    ("name", "module"), [("induction-2l", induction), ("modadd-p113", modular_addition)]
)
def test_local_manifest_names_recipe_seed_and_the_recipes_default_schedule(name, module):
    manifest = load_manifest(name)
    assert manifest.source == "local"
    assert manifest.local.seed == module.DEFAULTS["seed"]
    assert manifest.local.recipe in ("induction", "modular-addition")
    options = manifest.local.options
    assert {k: v for k, v in module.DEFAULTS.items() if k != "seed"} == options
    assert manifest.steps == log_then_linear(options["steps"], options["checkpoint_every"])


def test_induction_manifest_has_at_least_30_checkpoints():
    assert len(load_manifest("induction-2l").steps) >= 30


def test_manifest_yaml_round_trips():
    manifest = parse_manifest(VALID_LOCAL)
    again = parse_manifest(yaml.safe_load(manifest.to_yaml()))
    assert again == manifest


def test_load_manifest_accepts_a_run_folder(tmp_path: Path):
    (tmp_path / "manifest.yaml").write_text(parse_manifest(VALID_LOCAL).to_yaml())
    manifest = load_manifest(tmp_path)
    assert manifest.name == "my-run"
    assert manifest.checkpoint_root == tmp_path.resolve()


def test_unknown_manifest_name_lists_the_builtins():
    with pytest.raises(CircuitsError, match=r"'no-such-run'.*built-in: .*pythia-70m"):
        load_manifest("no-such-run")


def test_missing_yaml_file_names_the_path(tmp_path: Path):
    with pytest.raises(CircuitsError, match=r"absent\.yaml: cannot read manifest"):
        load_manifest(tmp_path / "absent.yaml")


def test_step_not_in_manifest_names_the_step_and_the_range():
    with pytest.raises(CircuitsError, match=r"pythia-70m: step 1500 is not in the run \(154 steps from 0 to 143000\)"):
        load_manifest("pythia-70m").require_step(1500)


# --- bad files --------------------------------------------------------------------------------

BAD_FILES = {
    "missing-tokens": (without(VALID_LOCAL, "tokens_per_step"), r"give exactly one of tokens_per_step .* and tokens .*not neither"),
    "missing-name": (without(VALID_LOCAL, "name"), r"field 'name': Field required"),
    "wrong-type": (with_value(VALID_LOCAL, "tokens_per_step", "many"), r"field 'tokens_per_step': .*integer.*'many'"),
    "wrong-type-steps": (with_value(VALID_LOCAL, "steps", {"a": 1}), r"field 'steps'"),
    "zero-tokens": (with_value(VALID_LOCAL, "tokens_per_step", 0), r"field 'tokens_per_step': .*greater than or equal to 1"),
    "unsorted-steps": (with_value(VALID_LOCAL, "steps", [0, 4, 2]), r"field 'steps': must be strictly increasing"),
    "repeated-steps": (with_value(VALID_LOCAL, "steps", [0, 2, 2]), r"field 'steps': must be strictly increasing"),
    "empty-steps": (with_value(VALID_LOCAL, "steps", []), r"field 'steps': must list at least one step"),
    "negative-step": (with_value(VALID_LOCAL, "steps", [-1, 0]), r"field 'steps\.0'"),
    "unknown-schedule": (with_value(VALID_HUB, "steps", "pythia-999"), r"field 'steps': unknown schedule 'pythia-999'"),
    "hub-without-hub-section": (without(VALID_HUB, "hub"), r"source is 'hub' but the 'hub' section .* is missing"),
    "local-without-local-section": (without(VALID_LOCAL, "local"), r"'local' section .* is missing"),
    "unknown-source": (with_value(VALID_LOCAL, "source", "s3"), r"field 'source': .*'hub' or 'local'"),
    "bad-repo": (with_value(VALID_HUB, "hub.repo", "not a repo"), r"field 'hub\.repo'"),
    "revision-without-placeholder": (with_value(VALID_HUB, "hub.revision_format", "main"), r"field 'hub\.revision_format': must contain the placeholder \{step\}"),
    "absolute-local-path": (with_value(VALID_LOCAL, "local.path", "/etc/runs"), r"field 'local\.path': must be a relative path"),
    "dotdot-local-path": (with_value(VALID_LOCAL, "local.path", "runs/../../secret"), r"field 'local\.path': must be a relative path.*'\.\.'"),
    "unknown-field": ({**VALID_LOCAL, "tokens_seen": 5}, r"field 'tokens_seen': Extra inputs are not permitted"),
    "bad-name": (with_value(VALID_LOCAL, "name", "my run!"), r"field 'name'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_manifest_error_names_the_file_and_the_field(tmp_path: Path, case: str):
    data, pattern = BAD_FILES[case]
    path = write_yaml(tmp_path, data)
    with pytest.raises(CircuitsError, match=pattern) as err:
        load_manifest(path)
    message = str(err.value)
    assert message.startswith(str(path) + ":")
    assert len(message.splitlines()) == 1


def test_error_stays_on_one_line_when_a_key_holds_a_newline():
    data = {**VALID_HUB, "hub": {"repo": "EleutherAI/pythia-70m", "bad\nkey": 1}}
    with pytest.raises(CircuitsError, match=r"field 'hub\.bad\\nkey': Extra inputs") as err:
        parse_manifest(data, origin="f.yaml")
    assert len(str(err.value).splitlines()) == 1


def test_binary_file_is_refused_as_not_text(tmp_path: Path):
    path = tmp_path / "bad-run.yaml"
    path.write_bytes(b"name: \xff\xfe\x00")
    with pytest.raises(CircuitsError, match=r"bad-run\.yaml: not a text file"):
        load_manifest(path)


def test_invalid_yaml_names_the_file_and_the_line(tmp_path: Path):
    path = write_yaml(tmp_path, "name: x\nsteps: [0, 1\nsource: local\n")
    with pytest.raises(CircuitsError, match=r"bad-run\.yaml: not valid YAML at line \d+"):
        load_manifest(path)


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("", "NoneType")])
def test_non_mapping_manifest_is_refused(tmp_path: Path, text: str, kind: str):
    path = write_yaml(tmp_path, text)
    with pytest.raises(CircuitsError, match=rf"bad-run\.yaml: expected a YAML mapping at the top level, got {kind}"):
        load_manifest(path)


# --- property: any mutation gives a Manifest or a CircuitsError, never another exception -------

ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
PATHS = ["name", "description", "source", "hub", "hub.repo", "hub.revision_format", "local",
         "local.path", "local.recipe", "local.seed", "local.options", "tokens_per_step", "steps",
         "architecture", "origin", "extra"]


@st.composite
def mutated_manifests(draw):
    data = copy.deepcopy(draw(st.sampled_from([VALID_LOCAL, VALID_HUB])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS)).split(".")
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if draw(st.booleans()):
            node.pop(path[-1], None)
        else:
            node[path[-1]] = draw(ANY_VALUE)
    return data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_manifests())
def test_any_mutated_manifest_is_valid_or_a_circuits_error(data):
    try:
        manifest = parse_manifest(data, origin="fuzz.yaml")
    except CircuitsError as err:
        assert str(err).startswith("fuzz.yaml: ")
        assert len(str(err).splitlines()) == 1
    else:
        assert isinstance(manifest, Manifest)
        assert manifest.steps == sorted(set(manifest.steps))


@settings(max_examples=100, deadline=None)
@given(data=ANY_VALUE)
def test_any_yaml_value_is_valid_or_a_circuits_error(data):
    with pytest.raises(CircuitsError):
        parse_manifest(data, origin="fuzz.yaml")
