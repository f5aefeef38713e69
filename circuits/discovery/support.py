"""Which models circuit discovery supports: every TL config field, honoured, refused or irrelevant.

The functional forward (``functional.py``) re-implements the bridge's forward. A field of
``model.cfg`` that changes that forward is either **honoured** (the functional forward reads
it, or reads the weights / modules it describes) or **refused** by name when set to a value
the functional forward does not implement. Fields that cannot change the logits (devices,
seeds, names, hook switches) are **irrelevant**. A test walks every field of
``TransformerBridgeConfig`` (also what a native model's ``cfg`` is) and of the configs of the
families the tests boot, and fails on a field in none of the three lists.

Whatever the lists say, ``FunctionalModel`` also checks its logits against the bridge's own
forward on a probe batch before any discovery (``functional.self_check``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from circuits.errors import CircuitsError

# field -> how the functional forward honours it
HONOURED: dict[str, str] = {
    "d_model": "shapes of the weights",
    "d_head": "shapes of the weights",
    "n_layers": "one block per layer",
    "n_heads": "one writer and three reader ports per query head",
    "n_key_value_heads": "grouped-query attention: each query head's k/v port uses its group's W_K/W_V",
    "d_mlp": "shapes of the weights",
    "intermediate_size": "HF's name for d_mlp: shapes of the weights",
    "d_vocab": "shapes of the weights; the probe's tokens",
    "d_vocab_out": "shape of W_U",
    "n_ctx": "the probe's length and the rotary tables",
    "attn_only": "no MLP writers or readers",
    "act_fn": "the MLP activation (relu, gelu, gelu_new, silu, ...)",
    "hidden_act": "HF's name for act_fn",
    "gated_mlp": "SwiGLU / GeGLU: act(x W_gate) * (x W_in)",
    "normalization_type": "LN, RMS, their Pre (weightless) forms, or none",
    "uses_rms_norm": "agrees with normalization_type",
    "final_rms": "the final norm's module is read as it is",
    "eps": "norm epsilon (the module's own when it has one)",
    "positional_embedding_type": "standard (learned W_pos) or rotary",
    "rotary_dim": "partial rotary: the first rotary_dim dimensions of q and k rotate",
    "rotary_base": "rotary frequencies (HF models: the model's own inv_freq buffer)",
    "rope_scaling": "native models: the native rotary tables (cos_cached / sin_cached) are read as they are",
    "rope_parameters": "rope_type default, linear, llama3, yarn, proportional (static tables); others refused",
    "rotary_adjacent_pairs": "GLM / ERNIE rotary: adjacent pairs rotate (GPT-J and native models always do)",
    "use_attn_scale": "attention scale (native: as NativeAttention; HF: the attention module's scaling)",
    "attn_scale": "attention scale",
    "attn_scores_soft_cap": "cap * tanh(scores / cap) before the mask",
    "output_logits_soft_cap": "cap * tanh(logits / cap)",
    "attention_dir": "causal mask, or none for bidirectional",
    "parallel_attn_mlp": "attention and MLP read the same residual (GPTNeoX, GPT-J)",
    "use_parallel_residual": "GPTNeoX's name for parallel_attn_mlp; must agree with it",
    "tie_word_embeddings": "W_U is read from the model, tied or not",
    "architecture": "selects the rotary layout (GPT-J and native: adjacent pairs) and the norm modules",
    "dtype": "computes in the weights' dtype",
    "attention_bias": "biases are read from the weights (zero when absent)",
    "use_qk_norm": "QK-norm is read from the attention's q_norm / k_norm modules (OLMo-2: across heads)",
}


def _truthy(value: Any) -> bool:
    return bool(value)


def _not_none(value: Any) -> bool:
    return value is not None


def _positive(value: Any) -> bool:
    return value is not None and float(value) > 0


@dataclass(frozen=True)
class Refusal:
    """A field whose value ``when(value)`` makes the functional forward wrong: ``message`` says why."""

    field: str
    when: Callable[[Any], bool]
    message: str


_R = Refusal
REFUSED: tuple[Refusal, ...] = (
    _R("use_local_attn", _truthy, "local (windowed) attention is not implemented"),
    _R("window_size", _not_none, "sliding-window attention is not implemented"),
    _R("attn_types", lambda v: v is not None and any(t != "global" for t in v), "local attention layers are not implemented"),
    _R("scale_attn_by_inverse_layer_idx", _truthy, "attention scaled by 1/layer (scale_attn_by_inverse_layer_idx) is not implemented"),
    _R("post_embedding_ln", _truthy, "a LayerNorm after the embedding (post_embedding_ln) is not implemented"),
    _R("qk_norm_after_rope", _truthy, "QK-norm after the rotary embedding (HunYuan) is not implemented"),
    _R("rotary_interleaved_cos_sin", _truthy, "Cohere's interleaved rotary cos/sin is not implemented"),
    _R("use_NTK_by_parts_rope", _truthy, "NTK-by-parts rotary scaling (use_NTK_by_parts_rope) is not implemented"),
    _R("rmsnorm_uses_offset", _truthy, "RMSNorm with a (1 + weight) offset (Gemma) is not implemented"),
    _R("use_normalization_before_and_after", _truthy, "norms before and after each sublayer (Gemma-2 sandwich) are not implemented"),
    _R("num_experts", _not_none, "mixture-of-experts MLPs are not implemented"),
    _R("experts_per_token", _not_none, "mixture-of-experts MLPs are not implemented"),
    _R("scale_embedding", _truthy, "scaled token embeddings (scale_embedding) are not implemented"),
    _R("relative_attention_max_distance", _not_none, "relative attention biases (T5) are not implemented"),
    _R("relative_attention_num_buckets", _not_none, "relative attention biases (T5) are not implemented"),
    _R("decoder_start_token_id", _not_none, "encoder-decoder models are not supported"),
    _R("per_layer_head_dim", _not_none, "per-layer head sizes are not implemented"),
    _R("per_layer_num_key_value_heads", _not_none, "per-layer key/value head counts are not implemented"),
    _R("is_audio_model", _truthy, "audio models are not supported"),
    _R("is_visual_model", _truthy, "vision models are not supported"),
    _R("is_multimodal", _truthy, "multimodal models are not supported"),
    _R("is_stateful", _truthy, "state-space (stateful) models are not supported"),
    _R("load_in_4bit", _truthy, "4-bit quantised weights are not supported"),
    _R("layer_norm_folding", _truthy, "folded LayerNorm weights (layer_norm_folding) are not supported: load without weight processing"),
    _R("layer_types", lambda v: v is not None and any(t != "full_attention" for t in v), "sliding-window layers (layer_types) are not implemented"),
)

# fields that cannot change the logits, by reason
IRRELEVANT: dict[str, str] = {
    **dict.fromkeys(("device", "n_devices", "attn_implementation"), "where or how kernels run, not what they compute"),
    **dict.fromkeys(("seed", "init_mode", "initializer_range", "init_weights"), "initialisation; the weights are read as they are"),
    **dict.fromkeys(("model_name", "original_architecture", "tokenizer_name", "n_params", "from_checkpoint",
                     "checkpoint_index", "checkpoint_label_type", "checkpoint_value"), "names and bookkeeping"),
    **dict.fromkeys(("default_prepend_bos", "tokenizer_prepends_bos", "tokenizer_appends_eos", "default_padding_side",
                     "eos_token_id", "bos_token_id", "pad_token_id"), "tokenizer settings; discovery gets token ids"),
    **dict.fromkeys(("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in", "use_hook_tokens"),
                    "hook switches of the bridge; the forward's value is the same"),
    "split_attention_weights": "how the adapter splits a fused qkv weight; W_Q/W_K/W_V are read after it",
    "trust_remote_code": "how the model was loaded; its forward is checked by the probe like any other",
    **dict.fromkeys(("vision_hidden_size", "vision_num_layers", "vision_num_heads", "mm_tokens_per_image"),
                    "vision towers (multimodal models are refused by is_multimodal)"),
    **dict.fromkeys(("NTK_by_parts_low_freq_factor", "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor"),
                    "only read with use_NTK_by_parts_rope, which is refused"),
}


def classify(field: str) -> str | None:
    """``honoured``, ``refused``, ``irrelevant``, or None for a field in no list."""
    if field in HONOURED:
        return "honoured"
    if any(r.field == field for r in REFUSED):
        return "refused"
    if field in IRRELEVANT:
        return "irrelevant"
    return None


def check_config(cfg: Any) -> None:
    """Refuse, in one line naming the field, a config the functional forward does not implement."""
    for refusal in REFUSED:
        value = getattr(cfg, refusal.field, None)
        if refusal.when(value):
            raise CircuitsError(f"circuit discovery does not support {refusal.field}={value!r}: {refusal.message}")
    if getattr(cfg, "attention_dir", "causal") not in ("causal", "bidirectional"):
        raise CircuitsError(f"circuit discovery does not support attention_dir={cfg.attention_dir!r}: "
                            "expected causal or bidirectional")
    parallel = getattr(cfg, "use_parallel_residual", None)
    if parallel is not None and bool(parallel) != bool(getattr(cfg, "parallel_attn_mlp", False)):
        raise CircuitsError(f"circuit discovery does not support use_parallel_residual={parallel!r} with "
                            f"parallel_attn_mlp={cfg.parallel_attn_mlp!r}: the two disagree")
