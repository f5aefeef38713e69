"""EAP and EAP-IG(5) of the EAP-IG library (hannamw/EAP-IG, on TransformerLens 2.x), timed.

Run as a script by ``circuits bench pythia --eap-ig-python PYTHON``, in *that* Python's
environment: it imports nothing from ``circuits`` (whose TransformerLens is 4.x). One JSON
argument: ``hf_folder`` (the benchmark's checkpoint, a Hugging Face GPTNeoX folder), ``prompts``
(a torch file of ``clean``, ``corrupted``, ``answer_pos``, ``correct``: the sweep's induction
prompts), ``device``, ``ig_steps``. Prints one JSON line: ``eap_s``, ``eap_ig_s`` (wall, one
pass over all prompts each), ``peak_rss_mb`` (``VmHWM``), ``peak_gpu_mb`` (CUDA only), versions.

The metric is the sweep's: the correct token's logit minus the mean logit, at the answer
positions, averaged. The prompts are token ids, not text, so the library's ``tokenize_plus``
is replaced here by one that passes them through (no padding: every prompt has 33 tokens).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, cast


def _hooked(hf_folder: str, device: str):
    """The checkpoint as a TransformerLens 2.x HookedTransformer, built offline from its config."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import GPTNeoXForCausalLM

    try:
        from transformer_lens.pretrained.weight_conversions import convert_neox_weights
    except ImportError:  # TransformerLens 2.x before weight_conversions
        from transformer_lens.loading_from_pretrained import convert_neox_weights

    hf = GPTNeoXForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    # config.json as written: transformers 5 keeps the rotary settings under rope_parameters
    c = json.loads((Path(hf_folder) / "config.json").read_text())
    rope = c.get("rope_parameters") or {}
    rotary_pct = rope.get("partial_rotary_factor", c.get("rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", c.get("rotary_emb_base", 10000))
    d_head = c["hidden_size"] // c["num_attention_heads"]
    cfg = HookedTransformerConfig(
        d_model=c["hidden_size"], d_head=d_head, n_heads=c["num_attention_heads"], d_mlp=c["intermediate_size"],
        n_layers=c["num_hidden_layers"], n_ctx=c["max_position_embeddings"], eps=c["layer_norm_eps"],
        d_vocab=c["vocab_size"], act_fn=c["hidden_act"], use_attn_scale=True, scale_attn_by_inverse_layer_idx=False,
        parallel_attn_mlp=c.get("use_parallel_residual", True), positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=int(rotary_pct * d_head), rotary_base=rotary_base,
        normalization_type="LN", original_architecture="GPTNeoXForCausalLM", device=device)
    if not hasattr(hf, "embed_out"):  # transformers 5 renamed it lm_head; TransformerLens 2.x reads embed_out
        hf.embed_out = hf.get_output_embeddings()
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_neox_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False)
    del hf
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    return model.to(device).eval()


def main() -> None:
    import eap.attribute as attribute  # type: ignore[import-not-found]
    import torch
    from eap.graph import Graph  # type: ignore[import-not-found]
    from torch.utils.data import DataLoader

    args = json.loads(sys.argv[1])
    device = args["device"]
    with open(args["prompts"]) as f:  # token ids as JSON lists
        prompts = {key: torch.tensor(value) for key, value in json.load(f).items()}
    model = _hooked(args["hf_folder"], device)

    def tokenize_plus(model, inputs, max_length=None):  # the prompts are ids already
        tokens = inputs.to(device)
        mask = torch.ones_like(tokens)
        return tokens, mask, mask.sum(1), tokens.shape[1]

    attribute.tokenize_plus = tokenize_plus
    rows = list(zip(prompts["clean"], prompts["corrupted"], zip(prompts["answer_pos"], prompts["correct"],
                                                                 strict=True), strict=True))

    def collate(batch):
        clean, corrupted, labels = zip(*batch, strict=True)
        positions, correct = zip(*labels, strict=True)
        return torch.stack(clean), torch.stack(corrupted), (torch.stack(positions), torch.stack(correct))

    loader: Any = DataLoader(cast(Any, rows), batch_size=len(rows), collate_fn=collate)

    def metric(logits, clean_logits, input_lengths, label):
        positions, correct = (t.to(logits.device) for t in label)
        at = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
        good = at.gather(2, correct[..., None])[..., 0]
        return (good - at.mean(-1)).mean()

    graph = Graph.from_model(model)
    # Untimed first: the first call pays one-off costs (hook set-up, allocator warm-up).
    attribute.attribute(model, graph, loader, metric, method="EAP", quiet=True)
    seconds = {}
    for key, method, steps in (("eap_s", "EAP", None), ("eap_ig_s", "EAP-IG-inputs", args["ig_steps"])):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        attribute.attribute(model, graph, loader, metric, method=method, ig_steps=steps, quiet=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds[key] = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    from importlib.metadata import PackageNotFoundError, version

    try:
        tl_version = version("transformer_lens")
    except PackageNotFoundError:
        tl_version = "?"
    print(json.dumps(seconds | {
        "peak_rss_mb": peak, "scores_shape": [int(graph.n_forward), int(graph.n_backward)],
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "transformer_lens": tl_version, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
