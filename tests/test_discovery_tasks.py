"""IOI and greater-than tasks: templated with the model's tokenizer (a word-level one built here)."""

import re

import pytest
import torch
from tiny_tokenizers import word_level_tokenizer

from circuits.errors import CircuitsError
from circuits.tasks import (
    GREATER_THAN_NOUNS,
    GREATER_THAN_TEMPLATE,
    IOI_NAMES,
    IOI_TEMPLATES,
    make_task,
    metric_per_example,
)


def _word_level_tokenizer():
    texts = [re.sub(r"\{\w+\}", " ", text) for text in (*IOI_TEMPLATES, GREATER_THAN_TEMPLATE)]
    return word_level_tokenizer(["17", *IOI_NAMES, *GREATER_THAN_NOUNS, *(f"{yy:02d}" for yy in range(100))], texts)


@pytest.fixture(scope="module")
def word_neox(tmp_path_factory):
    """A tiny GPTNeoX whose folder holds a word-level tokenizer; booted like a Hub model."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    path = tmp_path_factory.mktemp("word-neox")
    tokenizer = _word_level_tokenizer()
    tokenizer.save_pretrained(path)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).eval().save_pretrained(path)
    return TransformerBridge.boot_transformers(str(path), device="cpu").eval()


def test_ioi_prompts_align_and_answer_the_indirect_object(word_neox):
    task = make_task("ioi", word_neox, n_examples=8)
    tok = word_neox.tokenizer
    assert task.clean.shape == task.corrupted.shape and task.n_examples == 8
    first = task.prompts[0]
    io, s = tok.decode(task.correct[0]).strip(), tok.decode(task.wrong[0]).strip()
    assert first.count(s) == 2 and first.count(io) == 1 and first.index(io) < first.rindex(s)
    assert tok.decode(task.clean[0]).replace(" ,", ",") == first
    corrupt_names = set(tok.decode(task.corrupted[0]).split()) & set(IOI_NAMES)
    assert len(corrupt_names) == 3 and not corrupt_names & {io, s}
    # aligned: only the name positions differ
    differ = (task.clean != task.corrupted).sum(1)
    assert (differ <= 3).all() and (differ >= 2).all()
    logits = word_neox(task.clean)
    assert metric_per_example(logits, task).shape == (8,)
    assert make_task("ioi", word_neox, n_examples=8).prompt_hash() == task.prompt_hash()


def test_greater_than_prompts_and_answers(word_neox):
    task = make_task("greater-than", word_neox, n_examples=6)
    tok = word_neox.tokenizer
    k = task.options["k"]
    assert task.correct.shape == (6, k) and task.answer_pos.shape == (6, k)
    for row in range(6):
        yy = int(task.prompts[row].split(" 17")[1][:2])
        assert [int(tok.decode(t)) for t in task.correct[row]] == list(range(yy + 1, yy + 1 + k))
        assert [int(tok.decode(t)) for t in task.wrong[row]] == list(range(yy - k + 1, yy + 1))
    assert (task.clean != task.corrupted).sum(1).eq(1).all()
    assert tok.decode(task.corrupted[0]).split()[-5:] == ["01", "to", "the", "year", "17"]


def test_language_tasks_refuse_models_without_tokenizer():
    from circuits.checkpoint import bridge_native_module, new_native_model
    from circuits.recipes.induction import DEFAULTS, tl_config

    cfg = tl_config(dict(DEFAULTS))
    model = bridge_native_module(new_native_model(cfg), cfg, name="no-tokenizer")
    for name in ("ioi", "greater-than"):
        with pytest.raises(CircuitsError, match="tokenizer"):
            make_task(name, model)


def test_discovery_runs_on_ioi(word_neox):
    from circuits.discovery import discover

    task = make_task("ioi", word_neox, n_examples=8)
    untrained = discover(word_neox, task, method="eap-ig", ig_steps=3)
    assert untrained.gap_nil and untrained.n_edges == 0  # a random model does not do IOI: nothing to explain
    result = discover(word_neox, task, method="eap-ig", ig_steps=3, gap_z=0.0, scores=untrained.scores)
    assert result.spec.parallel_attn_mlp and result.reached and result.n_edges >= 1 and result.faithfulness >= 0.8
