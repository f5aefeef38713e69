"""Checkpointed suites on the Hub: branch names parsed into steps, per-step revisions in manifests,
the built-in suite manifests, and each family loaded by step from an offline Hub-style cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuits.errors import CircuitsError
from circuits.hub_revisions import manifest_from_hub, parse_revision
from circuits.manifest import load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[1]
CRFM_RUNS = ["alias-gpt2-small-x21", "battlestar-gpt2-small-x49", "caprica-gpt2-small-x81",
             "darkmatter-gpt2-small-x343", "expanse-gpt2-small-x777", "arwen-gpt2-medium-x21",
             "beren-gpt2-medium-x49", "celebrimbor-gpt2-medium-x81", "durin-gpt2-medium-x343",
             "eowyn-gpt2-medium-x777"]
OLMO = ["olmo-1b-0724", "olmo-2-0425-1b", "olmo-2-0425-1b-early-training"]
SUITES = [*OLMO, "amber", *CRFM_RUNS]


def hub_manifest(steps: list[int], revisions: dict[int, str], **extra) -> dict:
    return {"name": "t", "source": "hub", "hub": {"repo": "org/run", "revisions": revisions},
            "tokens_per_step": 1, "steps": steps, **extra}


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(CircuitsError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


# --- naming schemes -------------------------------------------------------------------------------

def test_pythia_name_gives_its_step_and_no_tokens():
    revision = parse_revision("step1000")
    assert (revision.scheme, revision.step, revision.tokens) == ("pythia", 1000, None)


def test_olmo_name_gives_step_and_tokens_in_billions_or_millions():
    assert (parse_revision("step1000-tokens4B").step, parse_revision("step1000-tokens4B").tokens) == (1000, 4 * 10**9)
    assert parse_revision("step20-tokens84M").tokens == 84 * 10**6


def test_olmo2_name_gives_step_tokens_and_its_stage():
    revision = parse_revision("stage2-ingredient3-step23852-tokens51B")
    assert (revision.scheme, revision.stage, revision.step, revision.tokens) == (
        "olmo-2", "stage2-ingredient3", 23852, 51 * 10**9)
    assert parse_revision("stage1-step1000-tokens3B").stage == "stage1"


def test_llm360_name_gives_the_checkpoint_index():
    assert (parse_revision("ckpt_007").scheme, parse_revision("ckpt_007").step) == ("llm360", 7)


def test_trainer_checkpoint_name_gives_its_step():
    assert (parse_revision("checkpoint-2200").scheme, parse_revision("checkpoint-2200").step) == ("hf-trainer", 2200)


def test_a_name_no_scheme_knows_is_refused_naming_it_and_an_example():
    message = one_line_error(manifest_from_hub, "org/run", ["step1000", "final-weights"])
    assert "'final-weights' matches no known checkpoint naming" in message
    assert "step1000-tokens4B" in message


def test_main_is_skipped_as_the_final_model_under_another_name():
    manifest = manifest_from_hub("org/run", ["main", "step1000-tokens4B"])
    assert manifest.steps == [1000]


def test_revisions_of_two_training_stages_are_refused():
    message = one_line_error(manifest_from_hub, "org/run", ["stage1-step1000-tokens3B", "stage2-ingredient1-step2000-tokens5B"])
    assert "different runs or training stages" in message


def test_two_revisions_of_one_step_are_refused_naming_both():
    message = one_line_error(manifest_from_hub, "org/run", ["step10-tokens1B", "step010-tokens1B"])
    assert "'step10-tokens1B' and 'step010-tokens1B' are both step 10" in message


def test_a_name_listed_twice_is_one_revision():
    assert manifest_from_hub("org/run", ["step10-tokens1B", "step10-tokens1B"]).steps == [10]


def test_listing_branches_offline_asks_for_a_list_of_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line_error(manifest_from_hub, "allenai/OLMo-1B-0724-hf", None)
    assert "pass the revision names instead (a file, one name per line)" in message


def test_names_without_tokens_on_a_run_no_manifest_describes_are_refused():
    message = one_line_error(manifest_from_hub, "org/run", ["ckpt_000", "ckpt_001"])
    assert "carry no token counts" in message and "tokens_per_step" in message


# --- manifests made from names --------------------------------------------------------------------

def test_tokens_come_from_the_names_when_they_carry_them():
    manifest = manifest_from_hub("org/run", ["step2000-tokens8B", "step1000-tokens4B"])
    assert manifest.steps == [1000, 2000]
    assert [manifest.tokens_seen(s) for s in manifest.steps] == [4 * 10**9, 8 * 10**9]
    assert manifest.hub.revision(2000) == "step2000-tokens8B"


def test_names_that_are_one_pattern_of_the_step_are_written_as_a_revision_format():
    manifest = manifest_from_hub("EleutherAI/pythia-70m", ["step0", "step1000", "step143000"])
    assert manifest.hub.revisions is None and manifest.hub.revision_format == "step{step}"
    # No tokens in Pythia's names: the built-in manifest of the same repo states the batch.
    assert manifest.tokens_per_step == load_manifest("pythia-70m").tokens_per_step
    assert manifest.architecture == "GPTNeoXForCausalLM"


def test_zero_padded_names_are_kept_as_a_per_step_map():
    manifest = manifest_from_hub("LLM360/Amber", ["ckpt_001", "ckpt_000"])
    assert manifest.hub.revisions == {0: "ckpt_000", 1: "ckpt_001"}
    assert manifest.tokens_seen(1) == load_manifest("amber").tokens_seen(1)


def test_a_manifest_from_names_round_trips_through_its_yaml():
    import yaml

    manifest = manifest_from_hub("allenai/OLMo-2-0425-1B", ["stage1-step0-tokens0B", "stage1-step10000-tokens21B"],
                                 name="olmo2-two")
    again = parse_manifest(yaml.safe_load(manifest.to_yaml()))
    assert again.model_dump(exclude={"origin"}) == manifest.model_dump(exclude={"origin"})


# --- the schema's per-step revisions --------------------------------------------------------------

def test_revisions_that_miss_a_step_are_one_line_naming_the_first_missing_step():
    message = one_line_error(parse_manifest, hub_manifest([0, 10, 20], {0: "a0", 20: "a20"}))
    assert "hub.revisions has no revision for step 10" in message


def test_a_revision_name_that_could_leave_the_cache_folder_is_refused():
    message = one_line_error(parse_manifest, hub_manifest([0], {0: "../../etc"}))
    assert "'../../etc' is not a revision name" in message


def test_one_revision_named_for_two_steps_is_refused():
    message = one_line_error(parse_manifest, hub_manifest([0, 1], {0: "same", 1: "same"}))
    assert "steps 0 and 1 both name revision 'same'" in message


def test_revisions_map_wins_over_the_revision_format():
    manifest = parse_manifest(hub_manifest([5], {5: "ckpt_005"}))
    assert manifest.hub.revision(5) == "ckpt_005"


def test_a_tokens_map_gives_tokens_seen_per_step():
    data = hub_manifest([0, 5], {0: "a", 5: "b"})
    del data["tokens_per_step"]
    manifest = parse_manifest({**data, "tokens": {0: 7, 5: 99}})
    assert (manifest.tokens_seen(0), manifest.tokens_seen(5)) == (7, 99)


# --- the built-in suite manifests -----------------------------------------------------------------

@pytest.mark.parametrize("name", SUITES)
def test_every_step_of_a_suite_manifest_names_a_revision_of_that_step(name: str):
    manifest = load_manifest(name)
    assert manifest.source == "hub"
    for step in manifest.steps:
        revision = manifest.hub.revision(step)
        if revision == "main":  # Amber's final checkpoint is its main branch (model card)
            assert (name, step) == ("amber", manifest.steps[-1])
            continue
        assert parse_revision(revision).step == step, (step, revision)


@pytest.mark.parametrize("name", OLMO)
def test_olmo_tokens_seen_agree_with_the_tokens_in_the_names(name: str):
    manifest = load_manifest(name)
    for step in manifest.steps:
        named = parse_revision(manifest.hub.revision(step)).tokens
        # Names round to whole billions; late OLMo-1 names run ~0.05% below step x batch.
        assert abs(named - manifest.tokens_seen(step)) <= 10**9 + 1e-3 * manifest.tokens_seen(step), step


@pytest.mark.parametrize("name", CRFM_RUNS)
def test_crfm_runs_hold_mistrals_published_checkpoint_schedule(name: str):
    # README of stanford-crfm/mistral: every 10 steps to 100, 50 to 2000, 100 to 20000, 1000 to 400000.
    schedule = sorted({*range(0, 101, 10), *range(100, 2001, 50), *range(2000, 20001, 100), *range(20000, 400001, 1000)})
    manifest = load_manifest(name)
    assert manifest.steps == schedule
    assert manifest.hub.repo == f"stanford-crfm/{name}"


def test_amber_counts_whole_data_chunks_seen_at_each_checkpoint():
    manifest = load_manifest("amber")
    chunk = 1_706_976 * 2048  # sequences per chunk x input tokens per sequence (amber-train main.py)
    assert manifest.steps == list(range(360))
    assert all(manifest.tokens_seen(n) == (n + 1) * chunk for n in manifest.steps)


# --- each family loads by step from an offline Hub-style cache ------------------------------------

FAMILIES = {
    # family: (Hub repo, two revision names, the steps they are)
    "olmo": ("allenai/OLMo-1B-0724-hf", ["step1000-tokens2B", "step2000-tokens4B"], [1000, 2000]),
    "olmo2": ("allenai/OLMo-2-0425-1B", ["stage1-step10000-tokens21B", "stage1-step20000-tokens42B"], [10000, 20000]),
    "gpt2": ("stanford-crfm/alias-gpt2-small-x21", ["checkpoint-100", "checkpoint-400000"], [100, 400000]),
    "llama": ("LLM360/Amber", ["ckpt_000", "ckpt_358"], [0, 358]),
}
VOCAB = 64


def tiny_model(family: str, seed: int):
    import transformers as tf

    small = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 64}
    config = {"olmo": lambda: tf.OlmoConfig(**small), "olmo2": lambda: tf.Olmo2Config(**small),
              "llama": lambda: tf.LlamaConfig(**small),
              "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)}[family]()
    model_class = {"olmo": tf.OlmoForCausalLM, "olmo2": tf.Olmo2ForCausalLM, "llama": tf.LlamaForCausalLM,
                   "gpt2": tf.GPT2LMHeadModel}[family]
    torch.manual_seed(seed)
    return model_class(config).eval()


def save_snapshot(model, path: Path) -> None:
    """``save_pretrained`` (safetensors) and a word-level tokenizer: TL's boot loads one, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(path)


LOAD_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
import circuits
from circuits.hub_revisions import manifest_from_hub

cases = json.loads(sys.argv[1])
result = {}
for family, (repo, revisions, steps) in cases.items():
    expected = load_file(sys.argv[2] + f"/{family}.safetensors")
    manifest = manifest_from_hub(repo, revisions)
    for step in steps:
        with torch.no_grad():
            logits = circuits.load(manifest, step)(expected["tokens"])
        result[f"{family}@{step}"] = {str(s): (logits - expected[str(s)]).abs().max().item() for s in steps}
with torch.no_grad():  # a built-in manifest finds the same cached revision by name
    logits = circuits.load("amber", 358)(load_file(sys.argv[2] + "/llama.safetensors")["tokens"])
result["amber-builtin@358"] = (logits - load_file(sys.argv[2] + "/llama.safetensors")["358"]).abs().max().item()
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def offline_loads(tmp_path_factory) -> dict:
    """Per family: a Hub-style cache with two revisions holding different weights, loaded by step in a
    child process (HF_HOME and HF_HUB_OFFLINE are read when huggingface_hub is imported)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hf-home")
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for index, (family, (repo, revisions, steps)) in enumerate(FAMILIES.items()):
        org, name = repo.split("/")
        cache = root / "hub" / f"models--{org}--{name}"
        (cache / "refs").mkdir(parents=True)
        expected = {"tokens": tokens}
        for seed, (revision, step) in enumerate(zip(revisions, steps, strict=True)):
            commit = f"{index:02x}{seed:02x}".ljust(40, "0")  # a commit hash: 40 hex digits
            model = tiny_model(family, seed)
            save_snapshot(model, cache / "snapshots" / commit)
            (cache / "refs" / revision).write_text(commit)
            with torch.no_grad():
                expected[str(step)] = model(tokens).logits.contiguous()
        save_file(expected, str(root / f"{family}.safetensors"))
    env = {**os.environ, "HF_HOME": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(variable, None)
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(FAMILIES), str(root)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_step_loads_its_own_revision_from_the_offline_cache(offline_loads: dict, family: str):
    steps = FAMILIES[family][2]
    for step in steps:
        diffs = offline_loads[f"{family}@{step}"]
        other = next(s for s in steps if s != step)
        assert diffs[str(step)] <= 1e-5, diffs  # the saved model of this revision
        assert diffs[str(other)] > 1e-2, diffs  # and not the other revision's


def test_a_builtin_suite_manifest_loads_the_cached_revision_by_its_name(offline_loads: dict):
    assert offline_loads["amber-builtin@358"] <= 1e-5


def test_discovery_refuses_the_crfm_gpt2_runs_in_one_line(tmp_path: Path):
    """Mistral trained them with attention scaled by 1/layer (conf/models/mistral-*.yaml), which the
    functional forward does not implement: the manifests say so, and discovery refuses by name."""
    import transformers as tf

    from circuits.discovery.functional import FunctionalModel
    from circuits.loading import boot_transformers

    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
    torch.manual_seed(0)
    save_snapshot(tf.GPT2LMHeadModel(config).eval(), tmp_path)
    bridge = boot_transformers(str(tmp_path), None, "cpu", where=str(tmp_path))
    message = one_line_error(FunctionalModel, bridge)
    assert "does not support scale_attn_by_inverse_layer_idx=True" in message
    assert "scale_attn_by_inverse_layer_idx=True" in load_manifest("alias-gpt2-small-x21").description
