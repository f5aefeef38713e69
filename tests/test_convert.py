"""Formats read safely: PyTorch files only through torch.load(weights_only=True), converted once to
safetensors; nanoGPT's ckpt.pt as a GPT-2 folder equal to nanoGPT's own forward; and the journeys
(a Hugging Face Trainer run, a nanoGPT folder) through `circuits manifest` + `sweep` + `summary`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from study_helpers import run_cli

import circuits
from circuits.errors import CircuitsError
from circuits.folder_manifest import manifest_from_folder
from circuits.manifest import load_manifest, parse_manifest

ATOL = 1e-5
VOCAB, BLOCK = 64, 40  # the induction task needs 33 positions and a vocabulary of 64


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))




def write_manifest(run: Path, steps: list[int], **local) -> None:
    data = {"name": "t", "source": "local", "local": {"path": ".", **local}, "tokens_per_step": 1, "steps": steps}
    (run / "manifest.yaml").write_text(parse_manifest(data).to_yaml())


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=BLOCK, vocab_size=VOCAB,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


TOKENS = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def bridge_logits(run: Path, step: int) -> torch.Tensor:
    with torch.no_grad():
        return circuits.load(run, step)(TOKENS)


# ---------------------------------------------------------------- pickles refused, nothing runs


@pytest.mark.parametrize("save", ["raw-pickle", "torch-save"])
def test_a_pt_file_holding_another_pickled_object_is_refused_and_runs_nothing(tmp_path, save):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    tiny_gpt2().config.save_pretrained(run)  # config.json beside: read as a plain state dict
    weights = run / "model_10.pt"
    if save == "raw-pickle":
        weights.write_bytes(pickle.dumps(Payload(marker)))
    else:  # what torch.save writes: a zip archive holding the pickle
        torch.save({"transformer.wte.weight": torch.zeros(2), "extra": Payload(marker)}, weights)
    write_manifest(run, [10], layout="files", pattern="model_{step}.pt")
    with pytest.raises(CircuitsError) as err:
        circuits.load(run, 10)
    assert str(err.value) == (f"{weights}: holds a pickled object other than tensors and plain values; refused "
                              "(PyTorch files are read with torch.load(weights_only=True), which runs nothing)")
    assert not marker.exists()
    assert not (run / ".circuits-converted" / "step10").exists()


def test_a_nanogpt_checkpoint_with_a_payload_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "step5").mkdir()
    torch.save({"model_args": {"n_layer": 1}, "model": {}, "config": Payload(marker)}, tmp_path / "step5" / "ckpt.pt")
    write_manifest(tmp_path, [5])
    with pytest.raises(CircuitsError, match=r"step5/ckpt\.pt: holds a pickled object other than tensors"):
        circuits.load(tmp_path, 5)
    assert not marker.exists()


def test_a_hugging_face_folder_with_a_pickled_payload_as_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    step = tmp_path / "step1"
    tiny_gpt2().config.save_pretrained(step)
    (step / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(tmp_path, [1])
    with pytest.raises(CircuitsError, match=r"step1/pytorch_model\.bin: holds a pickled object other than tensors"):
        circuits.load(tmp_path, 1)
    assert not marker.exists()


def test_a_pt_file_holding_plain_values_not_tensors_is_refused_as_no_state_dict(tmp_path):
    tiny_gpt2().config.save_pretrained(tmp_path)
    torch.save([1, 2, 3], tmp_path / "model_0.pt")
    write_manifest(tmp_path, [0], layout="files", pattern="model_{step}.pt")
    with pytest.raises(CircuitsError, match=r"model_0\.pt: not a state dict \(got list\)"):
        circuits.load(tmp_path, 0)


def test_a_trainers_training_args_bin_is_never_opened(tmp_path):
    """training_args.bin is a full pickle of TrainingArguments: not weights, never read."""
    marker = tmp_path / "pwned"
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-3" / "training_args.bin").write_bytes(pickle.dumps(Payload(marker)))
    write_manifest(tmp_path, [3], layout="hf-trainer")
    torch.testing.assert_close(bridge_logits(tmp_path, 3), hf_logits(model), atol=ATOL, rtol=0)
    assert not marker.exists()


# ---------------------------------------------------------------- state dicts, converted once


def test_a_state_dict_pt_file_loads_with_the_models_logits(tmp_path):
    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "model_7.pt")
    write_manifest(tmp_path, [7], layout="files", pattern="model_{step}.pt")
    torch.testing.assert_close(bridge_logits(tmp_path, 7), hf_logits(model), atol=ATOL, rtol=0)
    assert (tmp_path / ".circuits-converted" / "step7" / "model.safetensors").is_file()


def test_a_conversion_is_reused_while_its_source_is_unchanged_and_redone_when_it_changes(tmp_path):
    first, second = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    first.config.save_pretrained(tmp_path)
    source = tmp_path / "model_7.pt"
    torch.save(first.state_dict(), source)
    write_manifest(tmp_path, [7], layout="files", pattern="model_{step}.pt")
    converted = tmp_path / ".circuits-converted" / "step7" / "model.safetensors"
    circuits.load(tmp_path, 7)
    written = converted.stat().st_mtime_ns, converted.stat().st_ino
    circuits.load(tmp_path, 7)
    assert (converted.stat().st_mtime_ns, converted.stat().st_ino) == written
    torch.save(second.state_dict(), source)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write, whatever the clock's grain
    torch.testing.assert_close(bridge_logits(tmp_path, 7), hf_logits(second), atol=ATOL, rtol=0)


def test_a_hugging_face_folder_with_pytorch_model_bin_loads_through_its_conversion(tmp_path):
    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path / "checkpoint-4")
    torch.save(model.state_dict(), tmp_path / "checkpoint-4" / "pytorch_model.bin")
    write_manifest(tmp_path, [4], layout="hf-trainer")
    torch.testing.assert_close(bridge_logits(tmp_path, 4), hf_logits(model), atol=ATOL, rtol=0)
    assert not list((tmp_path / "checkpoint-4").glob("*.safetensors"))  # the run's own folder is untouched


def test_safetensors_files_with_one_config_beside_them_load_by_step(tmp_path):
    from safetensors.torch import save_file

    models = {step: tiny_gpt2(seed=step) for step in (1, 2)}
    models[1].config.save_pretrained(tmp_path)
    for step, model in models.items():
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, str(tmp_path / f"model_{step}.safetensors"))
    # The manifest as `circuits manifest` detects it, as a user would write it.
    (tmp_path / "manifest.yaml").write_text(manifest_from_folder(tmp_path, tokens_per_step=1).to_yaml())
    manifest = load_manifest(tmp_path)
    assert manifest.local is not None and manifest.local.pattern == "model_{step}.safetensors"
    for step, model in models.items():
        torch.testing.assert_close(bridge_logits(tmp_path, step), hf_logits(model), atol=ATOL, rtol=0)


def test_native_safetensors_files_with_one_native_config_load_by_step(tmp_path):
    from safetensors.torch import save_file

    from circuits.checkpoint import NATIVE_FORMAT, new_native_model
    from circuits.recipes import induction

    tl_config = induction.tl_config(dict(induction.DEFAULTS))
    (tmp_path / "config.json").write_text(json.dumps({"format": NATIVE_FORMAT, "tl_config": tl_config}))
    torch.manual_seed(3)
    model = new_native_model(tl_config).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights_40.safetensors"))
    write_manifest(tmp_path, [40], layout="files", pattern="weights_{step}.safetensors")
    tokens = TOKENS % tl_config["d_vocab"]
    with torch.no_grad():
        torch.testing.assert_close(circuits.load(tmp_path, 40)(tokens), model(tokens), atol=ATOL, rtol=0)


def test_a_missing_step_file_names_the_file_it_looked_for(tmp_path):
    tiny_gpt2().config.save_pretrained(tmp_path)
    write_manifest(tmp_path, [1, 2], layout="files", pattern="model_{step}.safetensors")
    with pytest.raises(CircuitsError, match=r"model_2\.safetensors: missing checkpoint file for step 2 of t"):
        circuits.load(tmp_path, 2)


def test_a_folder_without_tokenizer_files_boots_without_a_tokenizer_and_probes_the_whole_vocabulary(tmp_path):
    """transformers would build an empty placeholder tokenizer (1 token for GPT-2), which the head
    detectors' probes would take for the vocabulary."""
    from circuits.detectors import probe_tokens

    tiny_gpt2().save_pretrained(tmp_path / "step0")
    write_manifest(tmp_path, [0])
    model = circuits.load(tmp_path, 0)
    assert model.tokenizer is None
    probe = probe_tokens(model, n_examples=8)
    assert probe[:, 1:].unique().numel() > VOCAB // 2  # ids drawn from the model's 64, not from 1 or 2


# ---------------------------------------------------------------- nanoGPT


def nanogpt_weights(n_layer: int, n_head: int, n_embd: int, bias: bool, seed: int) -> dict[str, torch.Tensor]:
    """Hand-built weights under nanoGPT's names and shapes (Linear: out x in), lm_head tied to wte,
    the causal-mask buffers nanoGPT keeps without flash attention, and torch.compile's prefix."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    c = n_embd
    w = {"transformer.wte.weight": rand(VOCAB, c), "transformer.wpe.weight": rand(BLOCK, c)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        w |= {p + "ln_1.weight": 1 + rand(c), p + "attn.c_attn.weight": rand(3 * c, c),
              p + "attn.c_proj.weight": rand(c, c), p + "ln_2.weight": 1 + rand(c),
              p + "mlp.c_fc.weight": rand(4 * c, c), p + "mlp.c_proj.weight": rand(c, 4 * c),
              p + "attn.bias": torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)}
        if bias:
            w |= {p + "ln_1.bias": rand(c), p + "attn.c_attn.bias": rand(3 * c), p + "attn.c_proj.bias": rand(c),
                  p + "ln_2.bias": rand(c), p + "mlp.c_fc.bias": rand(4 * c), p + "mlp.c_proj.bias": rand(c)}
    w["transformer.ln_f.weight"] = 1 + rand(c)
    if bias:
        w["transformer.ln_f.bias"] = rand(c)
    w["lm_head.weight"] = w["transformer.wte.weight"]
    return {"_orig_mod." + k: v for k, v in w.items()}


def nanogpt_forward(w: dict[str, torch.Tensor], idx: torch.Tensor, n_layer: int, n_head: int) -> torch.Tensor:
    """nanoGPT's GPT.forward (model.py), written out: the independent computation."""
    w = {k.removeprefix("_orig_mod."): v for k, v in w.items()}
    b, t = idx.shape
    c = w["transformer.wte.weight"].shape[1]

    def ln(x, name):
        return F.layer_norm(x, (c,), w[name + ".weight"], w.get(name + ".bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][torch.arange(t)]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        q, k, v = linear(ln(x, p + "ln_1"), p + "attn.c_attn").split(c, dim=2)
        q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.tril(torch.ones(t, t)) == 0, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + linear(y, p + "attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), w["lm_head.weight"])


NANO_CONFIG = {"batch_size": 4, "block_size": BLOCK, "gradient_accumulation_steps": 2, "learning_rate": 6e-4,
               "dataset": "shakespeare_char", "compile": True}


def save_nanogpt(path: Path, weights: dict[str, torch.Tensor], n_layer: int, n_head: int, n_embd: int,
                 bias: bool, iter_num: int) -> None:
    """A ckpt.pt as nanoGPT's train.py saves it (model, optimizer, model_args, iter_num, best_val_loss, config)."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    model_args = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": BLOCK, "bias": bias,
                  "vocab_size": VOCAB, "dropout": 0.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": iter_num, "best_val_loss": torch.tensor(3.5), "config": NANO_CONFIG}, path)


@pytest.mark.parametrize("bias", [True, False])
def test_a_nanogpt_checkpoint_boots_with_nanogpts_own_logits(tmp_path, bias):
    weights = nanogpt_weights(n_layer=2, n_head=4, n_embd=32, bias=bias, seed=0)
    save_nanogpt(tmp_path / "step100" / "ckpt.pt", weights, 2, 4, 32, bias, iter_num=100)
    write_manifest(tmp_path, [100])
    expected = nanogpt_forward(weights, TOKENS, n_layer=2, n_head=4)
    torch.testing.assert_close(bridge_logits(tmp_path, 100), expected, atol=ATOL, rtol=0)
    config = json.loads((tmp_path / ".circuits-converted" / "step100" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu"


def test_nanogpt_files_named_by_step_are_detected_with_tokens_from_their_config(tmp_path):
    for step in (0, 250):
        save_nanogpt(tmp_path / f"ckpt_{step}.pt", nanogpt_weights(1, 2, 16, True, step), 1, 2, 16, True, step)
    manifest = manifest_from_folder(tmp_path)
    assert manifest.steps == [0, 250] and manifest.architecture == "GPT2LMHeadModel"
    # nanoGPT's tokens per iteration: gradient_accumulation_steps x batch_size x block_size
    assert manifest.tokens_per_step == NANO_CONFIG["gradient_accumulation_steps"] * NANO_CONFIG["batch_size"] * BLOCK


def test_a_nanogpt_checkpoint_of_a_modified_model_is_refused_naming_the_weight(tmp_path):
    weights = nanogpt_weights(1, 2, 16, True, 0) | {"_orig_mod.transformer.h.0.attn.rotary.freq": torch.zeros(4)}
    save_nanogpt(tmp_path / "step1" / "ckpt.pt", weights, 1, 2, 16, True, 1)
    write_manifest(tmp_path, [1])
    with pytest.raises(CircuitsError, match=r"weight 'transformer\.h\.0\.attn\.rotary\.freq' is not part of "
                                            r"nanoGPT's GPT"):
        circuits.load(tmp_path, 1)


# ---------------------------------------------------------------- the journeys


def study_steps_and_tokens(study_dir: Path) -> tuple[list[int], list[int]]:
    study = circuits.open_study(study_dir)
    return list(study.steps), [int(t) for t in study.tokens_seen]


def test_a_hugging_face_trainer_run_is_studied_with_manifest_sweep_and_summary(monkeypatch, capsys, tmp_path):
    from transformers import Trainer, TrainingArguments

    batch, seq = 4, 33
    data = torch.randint(0, VOCAB, (32, seq), generator=torch.Generator().manual_seed(0))

    class Sequences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": data[i], "labels": data[i]}

    run = tmp_path / "trainer-run"
    args = TrainingArguments(output_dir=str(run), max_steps=6, save_steps=2, per_device_train_batch_size=batch,
                             learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
                             include_num_input_tokens_seen=True, save_only_model=True, disable_tqdm=True, seed=0)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=Sequences()).train()
    saved = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert saved == [2, 4, 6]

    study, out = manifest_sweep_summary(monkeypatch, capsys, run, tmp_path / "study")
    assert f"{len(saved)} steps from {saved[0]} to {saved[-1]}" in out
    assert study_steps_and_tokens(study) == (saved, [step * batch * seq for step in saved])


def manifest_sweep_summary(monkeypatch, capsys, run: Path, study: Path) -> tuple[Path, str]:
    """``circuits manifest RUN``, ``sweep`` (4 prompts) and ``summary``, each exiting 0: the study and the summary."""
    for args in (("manifest", str(run)), ("sweep", str(run), "--task", "induction", "--out", str(study),
                                          "--n-examples", "4", "--batch-size", "4", "--no-progress")):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "summary", str(study))
    assert code == 0, err
    return study, out


def test_a_nanogpt_folder_is_studied_with_manifest_sweep_and_summary(monkeypatch, capsys, tmp_path):
    run = tmp_path / "nanogpt-run"
    steps = [0, 50, 100]
    for step in steps:
        save_nanogpt(run / f"step{step}" / "ckpt.pt", nanogpt_weights(2, 4, 32, False, step), 2, 4, 32, False, step)
    study, out = manifest_sweep_summary(monkeypatch, capsys, run, tmp_path / "study")
    assert "3 steps from 0 to 100" in out
    per_step = NANO_CONFIG["gradient_accumulation_steps"] * NANO_CONFIG["batch_size"] * BLOCK
    assert study_steps_and_tokens(study) == (steps, [step * per_step for step in steps])
