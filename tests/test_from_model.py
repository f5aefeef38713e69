"""Bring a model, not a folder: ``circuits.from_model`` and ``circuits import-weights`` write a run
folder (manifest + step folders, safetensors) whose checkpoints boot with the given model's logits."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import circuits
from circuits.checkpoint import bridge_native_module, new_native_model
from circuits.errors import CircuitsError
from circuits.runs import import_weights

sys.path.insert(0, str(Path(__file__).parent))

ATOL = 1e-5
TL_CONFIG = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_head": 8, "n_ctx": 17, "d_vocab": 24,
             "attn_only": True, "normalization_type": "LN", "act_fn": "relu",
             "positional_embedding_type": "standard", "seed": 0}
TOKENS = torch.randint(0, 24, (3, 17), generator=torch.Generator().manual_seed(7))


def native(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return new_native_model(TL_CONFIG).eval()


def tiny_gptneox(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=32)
    return GPTNeoXForCausalLM(config).eval()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return out.logits if hasattr(out, "logits") else out


def booted_logits(run: Path, step: int) -> torch.Tensor:
    return logits_of(circuits.load(run, step))


def test_tl_config_and_state_dict_boot_with_the_models_logits(tmp_path):
    model = native()
    manifest = circuits.from_model(model.state_dict(), tmp_path / "run", step=5, config=TL_CONFIG, tokens_per_step=10)
    assert manifest.steps == [5] and manifest.architecture == "TransformerLensNative"
    torch.testing.assert_close(booted_logits(tmp_path / "run", 5), logits_of(model), atol=ATOL, rtol=0)


def test_native_module_with_its_config_boots_with_its_logits(tmp_path):
    model = native()
    circuits.from_model(model, tmp_path / "run", step=0, config=TL_CONFIG, tokens_per_step=10)
    torch.testing.assert_close(booted_logits(tmp_path / "run", 0), logits_of(model), atol=ATOL, rtol=0)


def test_native_bridge_boots_with_its_logits(tmp_path):
    bridge = bridge_native_module(native(), TL_CONFIG, name="given")
    circuits.from_model(bridge, tmp_path / "run", step=3, tokens_per_step=10)
    torch.testing.assert_close(booted_logits(tmp_path / "run", 3), logits_of(bridge), atol=ATOL, rtol=0)


def test_hugging_face_model_boots_with_its_logits(tmp_path):
    model = tiny_gptneox()
    manifest = circuits.from_model(model, tmp_path / "run", step=2, tokens_per_step=10)
    assert manifest.architecture == "GPTNeoXForCausalLM"
    assert list((tmp_path / "run" / "step2").glob("*.safetensors"))
    torch.testing.assert_close(booted_logits(tmp_path / "run", 2), logits_of(model), atol=ATOL, rtol=0)


def test_hugging_face_bridge_boots_with_its_logits(tmp_path):
    from circuits.loading import boot_transformers

    tiny_gptneox().save_pretrained(tmp_path / "hf")
    bridge = boot_transformers(str(tmp_path / "hf"), None, "cpu", where="test")
    circuits.from_model(bridge, tmp_path / "run", step=1, tokens_per_step=10)
    torch.testing.assert_close(booted_logits(tmp_path / "run", 1), logits_of(bridge), atol=ATOL, rtol=0)


def test_a_second_call_adds_its_step_to_the_manifest(tmp_path):
    first, second = native(0), native(1)
    circuits.from_model(first, tmp_path / "run", step=0, config=TL_CONFIG, tokens_per_step=10)
    manifest = circuits.from_model(second, tmp_path / "run", step=100, config=TL_CONFIG)
    assert manifest.steps == [0, 100] and manifest.tokens_seen(100) == 1000
    torch.testing.assert_close(booted_logits(tmp_path / "run", 0), logits_of(first), atol=ATOL, rtol=0)
    torch.testing.assert_close(booted_logits(tmp_path / "run", 100), logits_of(second), atol=ATOL, rtol=0)


def test_each_checkpoint_records_its_step_and_tokens(tmp_path):
    circuits.from_model(native(), tmp_path / "run", step=4, config=TL_CONFIG, tokens_per_step=10)
    config = json.loads((tmp_path / "run" / "step4" / "config.json").read_text())
    assert (config["step"], config["tokens_seen"]) == (4, 40)


def test_a_step_already_there_is_refused_and_left_as_it_was(tmp_path):
    circuits.from_model(native(0), tmp_path / "run", step=0, config=TL_CONFIG, tokens_per_step=10)
    before = (tmp_path / "run" / "step0" / "model.safetensors").read_bytes()
    with pytest.raises(CircuitsError, match=r"step0: step 0 is already in this run"):
        circuits.from_model(native(1), tmp_path / "run", step=0, config=TL_CONFIG)
    assert (tmp_path / "run" / "step0" / "model.safetensors").read_bytes() == before


def test_a_new_run_without_tokens_per_step_is_refused(tmp_path):
    with pytest.raises(CircuitsError, match="a new run needs tokens_per_step"):
        circuits.from_model(native(), tmp_path / "run", step=0, config=TL_CONFIG)
    assert not (tmp_path / "run").exists()


def test_weights_that_do_not_fit_the_config_are_refused_naming_the_step(tmp_path):
    state = native().state_dict()
    state.pop("head.weight")
    with pytest.raises(CircuitsError, match=r"step 0: the weights do not match the TransformerLens config"):
        circuits.from_model(state, tmp_path / "run", step=0, config=TL_CONFIG, tokens_per_step=10)


def test_a_model_of_another_architecture_is_refused_in_the_same_run(tmp_path):
    circuits.from_model(native(), tmp_path / "run", step=0, config=TL_CONFIG, tokens_per_step=10)
    with pytest.raises(CircuitsError, match="checkpoints are TransformerLensNative, step 1 is GPTNeoXForCausalLM"):
        circuits.from_model(tiny_gptneox(), tmp_path / "run", step=1)
    assert circuits.load_manifest(tmp_path / "run").steps == [0]


def test_a_folder_holding_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CircuitsError, match="not empty and holds no run manifest"):
        circuits.from_model(native(), tmp_path, step=0, config=TL_CONFIG, tokens_per_step=10)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuits", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_import_weights_from_safetensors_writes_a_run_that_boots(tmp_path):
    model = native()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "tl_config.json").write_text(json.dumps(TL_CONFIG))
    done = cli("import-weights", str(tmp_path / "w.safetensors"), "--config", str(tmp_path / "tl_config.json"),
               "--step", "7", "--out", str(tmp_path / "run"), "--tokens-per-step", "10")
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(booted_logits(tmp_path / "run", 7), logits_of(model), atol=ATOL, rtol=0)


def test_import_weights_reads_a_training_checkpoint_pt_with_the_weights_under_model(tmp_path):
    model = native()
    torch.save({"model": model.state_dict(), "step": 7, "optimizer": {"lr": torch.tensor(1e-3)}}, tmp_path / "c.pt")
    (tmp_path / "tl_config.json").write_text(json.dumps(TL_CONFIG))
    import_weights(tmp_path / "c.pt", tmp_path / "tl_config.json", tmp_path / "run", step=7,
                   tokens_per_step=10)
    torch.testing.assert_close(booted_logits(tmp_path / "run", 7), logits_of(model), atol=ATOL, rtol=0)


class _WritesAFile:
    """Unpickling this would run code: it writes the file named by its argument."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_a_pt_holding_other_pickled_objects_is_refused_in_one_line_and_runs_nothing(tmp_path):
    target = tmp_path / "written-by-the-payload"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": _WritesAFile(str(target))}, f)
    (tmp_path / "tl_config.json").write_text(json.dumps(TL_CONFIG))
    done = cli("import-weights", str(tmp_path / "evil.pt"), "--config", str(tmp_path / "tl_config.json"),
               "--step", "0", "--out", str(tmp_path / "run"), "--tokens-per-step", "10")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "refused" in done.stderr and "evil.pt" in done.stderr
    assert not target.exists() and not (tmp_path / "run").exists()


def test_a_hugging_face_model_is_written_with_its_tokenizer(tmp_path):
    from tiny_tokenizers import word_level_tokenizer

    tokenizer = word_level_tokenizer([f"w{i}" for i in range(20)])
    circuits.from_model(tiny_gptneox(), tmp_path / "run", step=0, tokens_per_step=10, tokenizer=tokenizer)
    booted = circuits.load(tmp_path / "run", 0)
    words = tokenizer.encode("w3 w7", add_special_tokens=False)
    assert booted.tokenizer.encode("w3 w7", add_special_tokens=False) == words and len(words) == 2


def test_import_weights_with_a_hugging_face_config_boots_with_the_models_logits(tmp_path):
    model = tiny_gptneox()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    import_weights(tmp_path / "w.safetensors", tmp_path / "config.json", tmp_path / "run", step=3, tokens_per_step=10)
    torch.testing.assert_close(booted_logits(tmp_path / "run", 3), logits_of(model), atol=ATOL, rtol=0)
