"""The graph spec is stored with a study and read back, never guessed from names (issue 14)."""

from pathlib import Path

import numpy as np
import pytest
import torch

import circuits
from circuits.graph import GraphSpec
from circuits.manifest import parse_manifest
from circuits.sweep import sweep


def _neox_run(run: Path, parallel: bool, name: str) -> Path:
    """A local run of one step: a tiny GPTNeoX saved as a Hugging Face folder, its manifest naming
    no architecture (as a user's own run does)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5,
                           use_parallel_residual=parallel)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).eval().save_pretrained(run / "step0")
    manifest = parse_manifest({"name": name, "source": "local", "local": {"path": "."}, "tokens_per_step": 1,
                               "steps": [0]})
    (run / "manifest.yaml").write_text(manifest.to_yaml())
    return run


@pytest.mark.parametrize(("parallel", "name"), [(False, "neox-sequential"), (True, "my-run")],
                         ids=["sequential-named-neox", "parallel-named-otherwise"])
def test_a_study_reads_back_the_graph_of_the_model_it_analysed(tmp_path, parallel, name):
    run = _neox_run(tmp_path / "run", parallel, name)
    study = sweep(run, "induction", tmp_path / "study", method="eap", n_examples=4, resamples=2, trust_steps=0,
                  hooks="none", progress=False)
    want = GraphSpec(2, 4, has_mlp=True, parallel_attn_mlp=parallel)
    assert study.graph_spec == want
    reopened = circuits.open_study(tmp_path / "study")
    assert reopened.graph_spec == want and reopened.shard_provenance(0)["graph"] == want.to_dict()
    same_layer_head_to_mlp = {("a0.h0", "m0"), ("a1.h3", "m1")}
    edges = set(reopened.circuit(0).edges())
    assert same_layer_head_to_mlp <= edges if not parallel else not same_layer_head_to_mlp & edges


def test_the_tracking_valid_mask_follows_the_stored_graph(tmp_path):
    run = _neox_run(tmp_path / "run", False, "pythia-like-but-sequential")
    study = sweep(run, "induction", tmp_path / "study", method="eap", n_examples=4, resamples=2, trust_steps=0,
                  hooks="none", progress=False)
    scores = np.asarray(study.array_at(0, "circuit/scores"))
    spec = study.graph_spec
    head, mlp = spec.forward_index("a0.h1"), spec.backward_index("m0")
    assert spec.valid[head, mlp] and scores[head, mlp] != 0.0
