"""Loading a checkpoint as a TransformerBridge: native runs, local HF folders, the offline Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import circuits
from circuits.checkpoint import load_native_module, new_native_model, save_native_checkpoint
from circuits.errors import CircuitsError
from circuits.manifest import Manifest, load_manifest, parse_manifest
from circuits.recipes import induction

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def write_local_manifest(run: Path, steps: list[int], name: str = "test-run") -> Manifest:
    manifest = parse_manifest(
        {"name": name, "source": "local", "local": {"path": "."}, "tokens_per_step": 1, "steps": steps}
    )
    (run / "manifest.yaml").write_text(manifest.to_yaml())
    return load_manifest(run)


def tiny_gptneox(vocab_size: int = 100):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def trained_native(tmp_path_factory):
    """A native model trained 10 steps in the test, saved as step10 of a local run."""
    run = tmp_path_factory.mktemp("native-run")
    options = {**induction.DEFAULTS, "batch_size": 8}
    config = induction.tl_config(options)
    torch.manual_seed(0)
    model = new_native_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        tokens = induction.repeated_tokens(8, options["half_len"], options["vocab"], generator)
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_native_checkpoint(model, config, run, {"step": 10})
    write_local_manifest(run, [0, 10])  # step 0 is listed but was never saved
    tokens = induction.repeated_tokens(4, options["half_len"], options["vocab"], torch.Generator().manual_seed(1))
    return run, model, tokens


def test_native_checkpoint_loads_with_the_saved_models_logits(trained_native):
    run, model, tokens = trained_native
    bridge = circuits.load(load_manifest(run), 10)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), model(tokens), atol=ATOL, rtol=0)


def test_native_checkpoint_bridge_matches_the_bare_native_module(trained_native):
    run, _, tokens = trained_native
    bridge = circuits.load(run, 10)  # a run folder is accepted in place of a Manifest
    bare, config = load_native_module(run / "step10")
    assert config["step"] == 10
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), bare(tokens), atol=ATOL, rtol=0)


def test_loaded_bridge_exposes_transformer_lens_hooks(trained_native):
    run, _, tokens = trained_native
    bridge = circuits.load(run, 10)
    _, cache = bridge.run_with_cache(tokens)
    assert cache["blocks.1.attn.hook_pattern"].shape == (4, 4, tokens.shape[1], tokens.shape[1])


def test_built_in_induction_run_loads_at_every_step_it_lists(induction_run: Path):
    manifest = load_manifest(induction_run)
    tokens = induction.repeated_tokens(2, 16, 64, torch.Generator().manual_seed(3))
    for step in (manifest.steps[0], manifest.steps[-1]):
        bridge = circuits.load(manifest, step)
        bare, _ = load_native_module(induction_run / f"step{step}")
        with torch.no_grad():
            torch.testing.assert_close(bridge(tokens), bare(tokens), atol=ATOL, rtol=0)


def test_local_hugging_face_folder_loads_through_the_same_call(tmp_path: Path):
    model = tiny_gptneox()
    model.save_pretrained(tmp_path / "step0")
    write_local_manifest(tmp_path, [0], name="tiny-neox")
    bridge = circuits.load(tmp_path, 0)
    tokens = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), model(tokens).logits, atol=ATOL, rtol=0)


def _hf_garbage_weights(step: Path) -> None:
    (step / "model.safetensors").write_bytes(b"not a safetensors file")


def _hf_config_of_another_size(step: Path) -> None:
    config = json.loads((step / "config.json").read_text())
    config["hidden_size"] = 32
    (step / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", [_hf_garbage_weights, _hf_config_of_another_size],
                         ids=["garbage-weights", "config-of-another-size"])
def test_damaged_hugging_face_folder_is_one_line_naming_the_folder(tmp_path: Path, damage):
    tiny_gptneox().save_pretrained(tmp_path / "step0")
    write_local_manifest(tmp_path, [0], name="tiny-neox")
    damage(tmp_path / "step0")
    with pytest.raises(CircuitsError, match=r"step0: cannot load this checkpoint \(") as err:
        circuits.load(tmp_path, 0)
    assert len(str(err.value).splitlines()) == 1


# --- bad input -----------------------------------------------------------------------------------


def test_step_not_in_manifest_is_one_line_naming_the_step(trained_native):
    run, _, _ = trained_native
    with pytest.raises(CircuitsError, match=r"test-run: step 5 is not in the run \(2 steps from 0 to 10\)") as err:
        circuits.load(run, 5)
    assert len(str(err.value).splitlines()) == 1


def test_missing_checkpoint_folder_is_one_line_naming_the_folder(trained_native):
    run, _, _ = trained_native
    with pytest.raises(CircuitsError, match=r"step0: missing checkpoint folder for step 0 of test-run") as err:
        circuits.load(run, 0)
    assert len(str(err.value).splitlines()) == 1


def test_step_folder_without_config_is_a_missing_checkpoint(tmp_path: Path):
    (tmp_path / "step0").mkdir()
    write_local_manifest(tmp_path, [0])
    with pytest.raises(CircuitsError, match=r"step0: missing checkpoint \(no config.json"):
        circuits.load(tmp_path, 0)


def test_weights_that_do_not_match_their_config_are_refused(trained_native, tmp_path: Path):
    run, _, _ = trained_native
    step = tmp_path / "step10"
    step.mkdir()
    config = json.loads((run / "step10" / "config.json").read_text())
    config["tl_config"]["d_model"] = 32
    (step / "config.json").write_text(json.dumps(config))
    (step / "model.safetensors").write_bytes((run / "step10" / "model.safetensors").read_bytes())
    write_local_manifest(tmp_path, [10])
    with pytest.raises(CircuitsError, match=r"model.safetensors: damaged, or does not match its config.json"):
        circuits.load(tmp_path, 10)


def _garbage_weights(step: Path) -> None:
    (step / "model.safetensors").write_bytes(b"not a safetensors file")


def _truncated_weights(step: Path) -> None:
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])


def _config_without_tl_config(step: Path) -> None:
    config = json.loads((step / "config.json").read_text())
    del config["tl_config"]
    (step / "config.json").write_text(json.dumps(config))


def _config_with_bad_tl_config(step: Path) -> None:
    config = json.loads((step / "config.json").read_text())
    config["tl_config"]["d_model"] = "big"
    (step / "config.json").write_text(json.dumps(config))


def _config_not_an_object(step: Path) -> None:
    (step / "config.json").write_text("[1, 2]")


def _config_not_json(step: Path) -> None:
    (step / "config.json").write_text("{format: native")


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_garbage_weights, r"model\.safetensors: damaged, or does not match its config\.json"),
        (_truncated_weights, r"model\.safetensors: damaged, or does not match its config\.json"),
        (_config_without_tl_config, r"config\.json: field 'tl_config' is missing or not a mapping"),
        (_config_with_bad_tl_config, r"config\.json: field 'tl_config' does not describe a model"),
        (_config_not_an_object, r"config\.json: expected a JSON object, got list"),
        (_config_not_json, r"config\.json: not valid JSON \(line 1\)"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else "",
)
def test_damaged_checkpoint_is_one_line_naming_the_file(trained_native, tmp_path: Path, damage, pattern: str):
    run, _, _ = trained_native
    shutil.copytree(run / "step10", tmp_path / "step10")
    write_local_manifest(tmp_path, [10])
    damage(tmp_path / "step10")
    with pytest.raises(CircuitsError, match=pattern) as err:
        circuits.load(tmp_path, 10)
    assert len(str(err.value).splitlines()) == 1


def test_unknown_checkpoint_format_is_refused(tmp_path: Path):
    (tmp_path / "step0").mkdir()
    (tmp_path / "step0" / "config.json").write_text('{"hello": 1}')
    write_local_manifest(tmp_path, [0])
    with pytest.raises(CircuitsError, match=r"neither a circuits-native checkpoint nor a Hugging Face config"):
        circuits.load(tmp_path, 0)


def test_missing_run_folder_is_a_circuits_error(tmp_path: Path):
    with pytest.raises(CircuitsError, match=r"nothing-here': no such file, run folder or built-in manifest"):
        circuits.load(tmp_path / "nothing-here", 0)


def test_empty_run_folder_is_a_circuits_error_naming_its_manifest(tmp_path: Path):
    with pytest.raises(CircuitsError, match=r"manifest\.yaml: cannot read manifest"):
        circuits.load(tmp_path, 0)


# --- the offline Hub path -----------------------------------------------------------------------

HUB_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
import circuits
from circuits.errors import RetryableError

expected = load_file(sys.argv[1])
result = {}
bridge = circuits.load("pythia-70m-deduped", 1000)
with torch.no_grad():
    result["max_diff"] = (bridge(expected["tokens"]) - expected["logits"]).abs().max().item()
try:
    circuits.load("pythia-70m-deduped", 2000)
except circuits.CircuitsError as err:
    result["missing_step_error"] = str(err)
    result["missing_step_retryable"] = isinstance(err, RetryableError)
print(json.dumps(result))
"""
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory) -> dict:
    """Build a Hub-style cache holding step1000 of pythia-70m-deduped, load it offline in a child."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hf-home")
    repo = root / "hub" / "models--EleutherAI--pythia-70m-deduped"
    model = tiny_gptneox()
    model.save_pretrained(repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "step1000").write_text(SNAPSHOT)
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        save_file({"tokens": tokens, "logits": model(tokens).logits.contiguous()}, str(root / "expected.safetensors"))
    # HF_HOME and HF_HUB_OFFLINE are read when huggingface_hub is imported: set them in a fresh process.
    env = {**os.environ, "HF_HOME": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(root / "expected.safetensors")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_offline_hub_cache_loads_by_manifest_name_with_the_saved_models_logits(offline_hub: dict):
    assert offline_hub["max_diff"] <= ATOL


def test_offline_hub_step_missing_from_the_cache_is_one_line_naming_the_revision(offline_hub: dict):
    message = offline_hub["missing_step_error"]
    assert message.startswith("EleutherAI/pythia-70m-deduped@step2000: cannot load this checkpoint")
    assert "Hugging Face cache" in message
    assert len(message.splitlines()) == 1


def test_a_hub_checkpoint_that_fails_to_load_may_be_retried(offline_hub: dict):
    assert offline_hub["missing_step_retryable"]  # with a network, a failed download may pass next time
