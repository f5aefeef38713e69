"""Discovery right on every model it accepts: tiny random models of each family, booted offline.

Each family (Llama, OLMo, OLMo-2, Qwen2, GPT-2, GPT-J, GPTNeoX with and without parallel
residual) is built from a ``transformers`` config with random weights, saved with a local
word-level tokenizer (TL's boot loads one; there is no network) and booted through
``circuits.loading`` as the sweep boots a checkpoint. Oracles: the bridge's own logits,
and single-edge interventions written by hand with TL hooks on the bridge.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from circuits.discovery import discover, faithfulness, functional, score_edges, support
from circuits.discovery.faithfulness import Evaluator
from circuits.discovery.functional import FunctionalModel
from circuits.errors import CircuitsError
from circuits.graph import GraphSpec
from circuits.tasks import Task

VOCAB = 100
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64,
         "initializer_range": 0.2}  # weights large enough that q and k edges matter (attention not uniform)


CLIP = 0.5  # binds: with these weights |q|, |k|, |v| often exceed it (test_clip_qkv_binds_in_the_olmo_clip_family)


def _configs() -> dict:
    import transformers as tf

    gpt_style = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "initializer_range": 0.2}
    return {
        "llama": (tf.LlamaConfig(**SMALL, num_key_value_heads=2), tf.LlamaForCausalLM),
        "olmo": (tf.OlmoConfig(**SMALL), tf.OlmoForCausalLM),
        "olmo-clip-qkv": (tf.OlmoConfig(**SMALL, clip_qkv=CLIP), tf.OlmoForCausalLM),
        "olmo2": (tf.Olmo2Config(**SMALL, num_key_value_heads=2), tf.Olmo2ForCausalLM),
        "qwen2": (tf.Qwen2Config(**SMALL, num_key_value_heads=2), tf.Qwen2ForCausalLM),
        "gpt2": (tf.GPT2Config(**gpt_style), tf.GPT2LMHeadModel),
        "gptj": (tf.GPTJConfig(**gpt_style, rotary_dim=4), tf.GPTJForCausalLM),
        "neox-parallel": (tf.GPTNeoXConfig(**SMALL, rotary_pct=0.5, use_parallel_residual=True), tf.GPTNeoXForCausalLM),
        "neox-sequential": (tf.GPTNeoXConfig(**SMALL, rotary_pct=0.5, use_parallel_residual=False), tf.GPTNeoXForCausalLM),
        "llama-linear-rope": (tf.LlamaConfig(**SMALL, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 500.0}), tf.LlamaForCausalLM),
    }


FAMILIES = list(_configs())


def save_tiny(path, config, model_class, seed: int = 0) -> str:
    """A random ``model_class(config)`` and a word-level tokenizer (token ``t{i}`` = id i) in ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # random biases / norm weights, so that a bias or weight read wrongly shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(path)
    return str(path)


def boot(path: str):
    from circuits.loading import boot_transformers

    return boot_transformers(path, None, "cpu", where=path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    config, model_class = _configs()[request.param]
    path = save_tiny(tmp_path_factory.mktemp(request.param), config, model_class)
    return request.param, boot(path)


def _task(n: int = 5, pos: int = 10, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, VOCAB, (n, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, :5] = torch.randint(3, VOCAB, (n, 5), generator=gen)
    return Task("toy", clean, corrupted, torch.full((n, 1), -1), torch.full((n, 1), 3), torch.full((n, 1), 5))


def _metric(logits) -> float:
    return (logits[:, -1, 3] - logits[:, -1, 5]).mean().item()


# ------------------------------------------------------------------ (a) logits


def test_functional_logits_equal_the_bridges(family):
    name, model = family
    fm = FunctionalModel(model)  # the self-check already compared on the probe; compare on other tokens too
    tokens = _task().clean
    with torch.no_grad():
        expected, got = model(tokens), fm.run(tokens).logits
    assert functional._relative_error(got, expected) <= 1e-4, name
    run = fm.run(tokens)  # every edge ablated with the run's own outputs: nothing changes
    again = fm.run(tokens, ablate=torch.ones(fm.spec.shape), reference=run.writers).logits
    assert functional._relative_error(again, expected) <= 1e-4, name


def test_clip_qkv_binds_in_the_olmo_clip_family(tmp_path):
    """The clipped family tests something: without the clip, the same weights give other logits."""
    import transformers as tf

    config, model_class = _configs()["olmo-clip-qkv"]
    clipped = boot(save_tiny(tmp_path / "clipped", config, model_class))
    unclipped = boot(save_tiny(tmp_path / "unclipped", tf.OlmoConfig(**SMALL), model_class))
    tokens = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (clipped(tokens) - unclipped(tokens)).abs().max() > 1e-2


def test_port_gradients_fast_path_equals_per_port_copies(family):
    name, model = family
    fm = FunctionalModel(model)
    tokens = _task(n=3).clean
    fast = fm.run(tokens, grad_ports=True)
    g_fast = fm.port_grads(fast, fast.logits[:, -1, 3].sum())
    slow = fm.run(tokens, grad_ports=True, ablate=torch.zeros(fm.spec.shape), reference=fast.writers.detach())
    g_slow = fm.port_grads(slow, slow.logits[:, -1, 3].sum())
    assert (g_fast - g_slow).abs().max().item() <= 1e-5 * max(1.0, g_slow.abs().max().item()), name


# ------------------------------------------------------------------ (b) one edge by hand


def _head_write(model, cache, layer: int, head: int) -> torch.Tensor:
    """What head ``layer.head`` adds to the residual, from the bridge's own activations.

    OLMo-2 normalises the attention output after it (post-norm): a head writes its result
    scaled as the whole output is normalised (docs/discovery.md).
    """
    if f"blocks.{layer}.attn.hook_result" in cache:
        result = cache[f"blocks.{layer}.attn.hook_result"]  # [batch pos head d_model]
    else:  # GPT-J's attention bridge has no per-head result: z_h @ W_O[h]
        result = torch.einsum("bphe,hed->bphd", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer])
    block = model.blocks[layer]
    post = getattr(block, "ln1_post", None)
    if post is None:
        return result[:, :, head]
    inner = getattr(post, "original_component", post)
    total = result.sum(2)
    inv = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + inner.variance_epsilon)
    return result[:, :, head] * inv * inner.weight


def _by_hand(model, task: Task, writer_hook, reader_hook: str, reader_head: int | None) -> float:
    """Metric of the clean run with ``reader_hook`` (head ``reader_head``) given the corrupted writer output."""
    if getattr(model.cfg, "architecture", "") == "GPTJForCausalLM":
        return _by_hand_gptj(model, task, writer_hook, reader_hook, reader_head)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, clean = model.run_with_cache(task.clean)
            _, corrupt = model.run_with_cache(task.corrupted)
            delta = writer_hook(model, corrupt) - writer_hook(model, clean)

            def patch(tensor, hook):
                tensor = tensor.clone()
                if reader_head is None:
                    tensor += delta
                else:
                    tensor[:, :, reader_head] += delta
                return tensor

            return _metric(model.run_with_hooks(task.clean, fwd_hooks=[(reader_hook, patch)]))
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_attn_result(False)


def _by_hand_gptj(model, task: Task, writer_hook, reader_hook: str, reader_head: int | None) -> float:
    """GPT-J's attention bridge has no split q/k/v inputs: a q-port edge is patched at the q
    projection's output, head ``reader_head`` recomputed from ``ln1(resid_pre + delta)``."""
    with torch.no_grad():
        _, clean = model.run_with_cache(task.clean)
        _, corrupt = model.run_with_cache(task.corrupted)
        delta = writer_hook(model, corrupt) - writer_hook(model, clean)
        if reader_head is None:
            hook = reader_hook

            def patch(tensor, hook):
                return tensor + delta
        else:
            assert reader_hook.endswith("hook_q_input"), reader_hook
            layer = int(reader_hook.split(".")[1])
            hook = f"blocks.{layer}.attn.q.hook_out"
            normed = model.blocks[layer].ln1(clean[f"blocks.{layer}.hook_resid_pre"] + delta)
            q_head = normed @ model.W_Q[layer, reader_head]  # GPT-J's q projection has no bias

            def patch(tensor, hook):
                tensor = tensor.clone()
                tensor[:, :, reader_head] = q_head
                return tensor

        return _metric(model.run_with_hooks(task.clean, fwd_hooks=[(hook, patch)]))


def test_exact_patching_of_one_edge_equals_a_hook_intervention(family):
    from circuits.discovery.scoring import score_patching

    name, model = family
    task = _task(seed=3)
    fm = FunctionalModel(model)
    spec = fm.spec
    scores = score_patching(fm, task).mean(0)
    with torch.no_grad():
        base = _metric(model(task.clean))
    cases = [  # (edge, writer output from a cache, reader hook, reader head)
        ("a0.h1->a1.h2<q>", lambda m, c: _head_write(m, c, 0, 1), "blocks.1.attn.hook_q_input", 2),
        # a v port where TL's ports are per query head (no GQA; GPT-J has no split inputs)
        ("a0.h2->a1.h0<v>", lambda m, c: _head_write(m, c, 0, 2), "blocks.1.attn.hook_v_input", 0)
        if fm.n_kv == fm.n_heads and name != "gptj" else
        ("a0.h2->a1.h3<q>", lambda m, c: _head_write(m, c, 0, 2), "blocks.1.attn.hook_q_input", 3),
        ("m1->logits", lambda m, c: c["blocks.1.hook_mlp_out"], "blocks.1.hook_resid_post", None),
        ("a1.h3->logits", lambda m, c: _head_write(m, c, 1, 3), "blocks.1.hook_resid_post", None),
    ]
    for edge, writer, hook, head in cases:
        patched = _by_hand(model, task, writer, hook, head)
        assert patched != base, (name, edge)
        assert scores[spec.edge_index(edge)] == pytest.approx(patched - base, abs=1e-5, rel=1e-4), (name, edge)


def test_gqa_edge_into_every_query_head_of_a_group_is_tls_kv_head_port(tmp_path):
    """k ports are per query head; ablating an edge into both query heads of kv group 1 (heads
    2 and 3) is what TL's per-kv-head ``hook_k_input`` sees."""
    from circuits.discovery.scoring import Ablator, References

    config, model_class = _configs()["llama"]
    model = boot(save_tiny(tmp_path, config, model_class))
    task = _task(seed=4)
    fm = FunctionalModel(model)
    spec = fm.spec
    mask = torch.zeros(1, *spec.shape)
    for head in (2, 3):
        mask[(0, *spec.edge_index(f"a0.h1->a1.h{head}<k>"))] = 1.0
    refs = References.of(fm, task)
    ours = Ablator(fm, task, refs.corrupt_writers, refs).metrics(mask).item()
    theirs = _by_hand(model, task, lambda m, c: _head_write(m, c, 0, 1), "blocks.1.attn.hook_k_input", 1)
    assert ours == pytest.approx(theirs, abs=1e-5, rel=1e-4)


# ------------------------------------------------------------------ (c) faithfulness


def test_faithfulness_is_one_for_the_full_graph_and_zero_for_the_empty(family):
    name, model = family
    fm = FunctionalModel(model)
    ev = Evaluator(fm, _task(n=6, seed=5), gap_z=0.0)
    assert not ev.gap_nil, name
    assert ev.faithfulness(fm.spec.valid) == pytest.approx(1.0, abs=1e-4), name
    assert ev.faithfulness(np.zeros(fm.spec.shape, dtype=bool)) == pytest.approx(0.0, abs=1e-4), name


# ------------------------------------------------------------------ native models: every honoured field

NATIVE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_head": 8, "d_mlp": 64, "n_ctx": 16, "d_vocab": VOCAB,
          "act_fn": "gelu", "normalization_type": "LN", "positional_embedding_type": "standard", "seed": 0}
NATIVE_VARIANTS = {
    "bidirectional": {"attention_dir": "bidirectional"},
    "gqa-rotary-rms-swiglu": {"n_key_value_heads": 2, "positional_embedding_type": "rotary", "rotary_dim": 4,
                              "normalization_type": "RMS", "final_rms": True, "gated_mlp": True, "act_fn": "silu"},
    "soft-caps-and-scale": {"attn_scores_soft_cap": 2.0, "output_logits_soft_cap": 3.0, "attn_scale": 4.0},
    "no-norm-relu": {"normalization_type": None, "act_fn": "relu"},
    "weightless-norm-geglu": {"normalization_type": "LNPre", "gated_mlp": True},
}


def native(**overrides):
    from circuits.checkpoint import bridge_native_module, new_native_model

    cfg = {**NATIVE, **overrides}
    torch.manual_seed(0)
    module = new_native_model(cfg)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return bridge_native_module(module, cfg, name="native")


@pytest.mark.parametrize("variant", list(NATIVE_VARIANTS))
def test_native_variants_match_the_bridge_and_their_ends(variant):
    model = native(**NATIVE_VARIANTS[variant])
    fm = FunctionalModel(model)
    tokens = _task(pos=12).clean
    with torch.no_grad():
        assert functional._relative_error(fm.run(tokens).logits, model(tokens)) <= 1e-4
    ev = Evaluator(fm, _task(n=6, pos=12, seed=5), gap_z=0.0)
    assert ev.faithfulness(fm.spec.valid) == pytest.approx(1.0, abs=1e-4)
    assert ev.faithfulness(np.zeros(fm.spec.shape, dtype=bool)) == pytest.approx(0.0, abs=1e-4)


def test_bidirectional_models_are_discovered_not_refused():
    model = native(attention_dir="bidirectional")
    task = _task(n=6, pos=12, seed=6)
    causal_view = FunctionalModel(native())  # same weights, causal: a different model
    with torch.no_grad():
        clean = model(task.clean)
    result = discover(model, task, method="eap", target=0.5, gap_z=0.0)
    assert result.metric_clean == pytest.approx(_metric(clean), abs=1e-5)
    assert causal_view.run(task.clean).logits[:, 0].sub(clean[:, 0]).abs().max() > 1e-3
    assert score_edges(model, task, "patching").shape == GraphSpec.from_model(model).shape
    assert faithfulness(model, task, GraphSpec.from_model(model).valid, gap_z=0.0) == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------ the self-check


def test_self_check_names_the_first_layer_that_differs():
    model = native()
    model.cfg.attention_dir = "bidirectional"  # the config now lies: the module was built causal
    with pytest.raises(CircuitsError, match=r"does not reproduce .*first at blocks\.0\.attn\.hook_pattern, "
                                            r"the attention pattern \(mask / attention_dir"):
        FunctionalModel(model)


def test_self_check_runs_once_per_model_and_again_when_weights_change(monkeypatch):
    model = native()
    calls = []
    real = functional._relative_error
    monkeypatch.setattr(functional, "_relative_error", lambda got, exp: calls.append(1) or real(got, exp))
    FunctionalModel(model)
    FunctionalModel(model)
    assert len(calls) == 1
    with torch.no_grad():
        model.W_U.mul_(1.0)  # an in-place write bumps the version: checked again
        next(model.parameters()).mul_(1.0)
    FunctionalModel(model)
    assert len(calls) == 2


# ------------------------------------------------------------------ refused, by name


def _trigger(refusal: support.Refusal):
    for value in (True, 2, ["local"], ["sliding_attention"]):
        try:
            if refusal.when(value):
                return value
        except (TypeError, ValueError):
            continue
    raise AssertionError(f"no value triggers the refusal of {refusal.field}")


@pytest.mark.parametrize("refusal", support.REFUSED, ids=[r.field for r in support.REFUSED])
def test_every_refused_field_is_refused_in_one_line_naming_it(refusal):
    model = native()
    old = getattr(model.cfg, refusal.field, None)
    value = _trigger(refusal)
    object.__setattr__(model.cfg, refusal.field, value)
    try:
        with pytest.raises(CircuitsError, match=rf"does not support {refusal.field}={value!r}: ".replace("[", r"\[")) as err:
            FunctionalModel(model)
        assert "\n" not in str(err.value)
    finally:
        object.__setattr__(model.cfg, refusal.field, old)


def test_refused_values_of_honoured_fields(tmp_path):
    import transformers as tf

    with pytest.raises(CircuitsError, match="does not support rope_type 'dynamic': its frequencies depend on the "
                                            "sequence length"):
        config = tf.LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
        FunctionalModel(boot(save_tiny(tmp_path, config, tf.LlamaForCausalLM)))
    with pytest.raises(CircuitsError, match="activation 'solu' is not supported by circuit discovery"):
        FunctionalModel(native(act_fn="solu"))
    model = native()
    model.cfg.attention_dir = "sideways"
    with pytest.raises(CircuitsError, match="does not support attention_dir='sideways': expected causal or bidirectional"):
        FunctionalModel(model)


# ------------------------------------------------------------------ every config field is in a list


def _config_fields() -> set[str]:
    from transformer_lens.config import TransformerBridgeConfig, TransformerLensConfig

    fields = {f.name for f in dataclasses.fields(TransformerLensConfig)}
    fields |= {p for p in inspect.signature(TransformerBridgeConfig).parameters if p != "kwargs"}
    fields |= set(vars(TransformerBridgeConfig(d_model=8, d_head=2, n_layers=1, n_ctx=4)))
    return {f for f in fields if not f.startswith("_")}


def test_every_config_field_is_honoured_refused_or_irrelevant(family):
    """TransformerBridgeConfig's fields (a native model's cfg is one too) and whatever each
    booted family's adapter adds to its cfg."""
    name, model = family
    fields = _config_fields() | {f for f in vars(model.cfg) if not f.startswith("_")} | set(vars(native().cfg))
    missing = sorted(f for f in fields if support.classify(f) is None)
    assert not missing, f"{name}: config fields in none of support.HONOURED / REFUSED / IRRELEVANT: {missing}"


# ------------------------------------------------------------------ a known circuit, bidirectional

V = 4  # tokens; d_model = token one-hots, 2 position one-hots, then V output dimensions


def known_bidirectional_model():
    """One uniform head (W_Q = W_K = 0) that copies every token into an output subspace the
    unembedding reads. Attending both ways, position 0 sees the token after it: the logits
    there are (onehot(tok0) + onehot(tok1)) / 2. Circuit: input -> a0.h0<v> -> logits."""
    from circuits.checkpoint import bridge_native_module, new_native_model

    cfg = {"d_model": 2 * V + 2, "n_layers": 1, "n_heads": 1, "d_head": V, "n_ctx": 2, "d_vocab": V, "attn_only": True,
           "normalization_type": None, "positional_embedding_type": "standard", "attention_dir": "bidirectional"}
    module = new_native_model(cfg)
    state = {k: torch.zeros_like(v) for k, v in module.state_dict().items()}
    eye = torch.eye(V)
    state["tok_embed.weight"][:, :V] = eye
    state["pos.weight"][:, V : V + 2] = torch.eye(2)
    state["layers.0.attn.v.weight"][:, :V] = eye
    state["layers.0.attn.o.weight"][V + 2 :, :] = eye
    state["head.weight"][:, V + 2 :] = eye
    module.load_state_dict(state)
    return bridge_native_module(module.eval(), cfg, name="known-bidirectional")


def test_known_bidirectional_circuit_is_found_by_every_method():
    model = known_bidirectional_model()
    triples = [(0, 1, 2), (1, 2, 3), (3, 0, 1), (2, 3, 0)]  # (first token, later token, its corruption)
    clean = torch.tensor([[a, b] for a, b, _ in triples])
    corrupted = torch.tensor([[a, c] for a, _, c in triples])
    task = Task("later-token", clean, corrupted, torch.zeros(4, 1, dtype=torch.long), clean[:, 1:], corrupted[:, 1:])
    spec = GraphSpec.from_model(model)
    known = {"input->a0.h0<v>": -1.0, "a0.h0->logits": -1.0}  # corrupting either flips +0.5 to -0.5
    with torch.no_grad():
        own = model(clean)[:, 0]
    assert ((own.gather(1, clean[:, 1:]) - own.gather(1, corrupted[:, 1:])) == 0.5).all()
    for method in ("eap", "eap-ig", "patching"):
        scores = score_edges(model, task, method)
        for edge in spec.edge_names():
            assert scores[spec.edge_index(edge)] == pytest.approx(known.get(edge, 0.0), abs=1e-6), (method, edge)
        result = discover(model, task, method=method, target=0.99)
        assert set(spec.edge_names(result.in_circuit)) == set(known), method
        assert result.faithfulness == pytest.approx(1.0, abs=1e-6)
        assert result.metric_clean == pytest.approx(0.5, abs=1e-6) and result.metric_corrupted == pytest.approx(-0.5)
