"""Circuit discovery on the built-in induction run (the session fixture ``induction_run``)."""

import numpy as np
import pytest
import torch

from circuits.detectors import head_scores
from circuits.discovery import discover, score_edges
from circuits.discovery.analysis import circuit_analysis
from circuits.graph import GraphSpec, parse_edge, parse_node
from circuits.loading import load
from circuits.manifest import load_manifest
from circuits.tasks import make_task
from circuits.visit import VisitContext


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _attention_only_edges(n_layers: int, n_heads: int) -> int:
    """Edges of an attention-only model's graph, counted by hand: the input feeds every reader
    (q, k, v of every head, and the logits); a head of layer l feeds the q, k, v of every head
    in later layers, and the logits."""
    readers = 3 * n_layers * n_heads + 1
    return readers + sum(n_heads * (3 * n_heads * (n_layers - 1 - layer) + 1) for layer in range(n_layers))


@pytest.fixture(scope="module")
def final_and_first(induction_run):
    manifest = load_manifest(induction_run / "manifest.yaml")
    return manifest, load(manifest, manifest.steps[-1]), load(manifest, manifest.steps[0])


def test_final_circuit_is_small_and_faithful_and_first_is_not(final_and_first):
    manifest, final, first = final_and_first
    task = make_task("induction", final, n_examples=32)
    result = discover(final, task, method="eap-ig", ig_steps=5, target=0.8)
    print(f"final step: {result.n_edges}/{result.n_edges_total} edges, faithfulness {result.faithfulness:.3f}; "
          f"top edges {result.edges()[:6]}")
    assert result.reached and result.faithfulness >= 0.8
    assert result.n_edges_total == _attention_only_edges(final.cfg.n_layers, final.cfg.n_heads)
    assert result.n_edges <= 0.3 * result.n_edges_total
    early = discover(first, task, method="eap-ig", ig_steps=5, target=0.8, max_edges=result.n_edges)
    print(f"first step: gap nil {early.gap_nil}, faithfulness {early.faithfulness}, {early.message}")
    assert early.gap_nil or not early.reached


def test_final_circuit_has_previous_token_head_feeding_induction_head_key(final_and_first):
    """The induction mechanism (Olsson et al. 2022), read off the detectors and the circuit.

    Measured on the default run at step 1000: previous-token scores in layer 0 are
    0.30/0.47/0.61/0.31 (heads 0-3), induction scores in layer 1 0.71/0.80/0.72/0.72 (layer 0
    below 0.05); the EAP-IG circuit (21 edges) holds a0.h1 and a0.h2 -> every a1.h*<k>, and
    no other key edge.
    """
    _, final, _ = final_and_first
    scores = {kind: value.numpy() for kind, value in head_scores(final).items()}
    prev_heads = [int(h) for h in np.flatnonzero(scores["previous_token"][0] > 0.4)]
    induction_heads = [int(h) for h in np.flatnonzero(scores["induction"][1] > 0.5)]
    assert prev_heads, f"no previous-token head in layer 0: {scores['previous_token'][0]}"
    assert induction_heads, f"no induction head in layer 1: {scores['induction'][1]}"
    assert scores["induction"][0].max() < 0.2  # layer 0 cannot do induction: it has no earlier head to read
    top_prev, top_induction = int(scores["previous_token"][0].argmax()), int(scores["induction"][1].argmax())

    task = make_task("induction", final, n_examples=32)
    result = discover(final, task, method="eap-ig", ig_steps=5, target=0.8)
    edges = set(result.edges())
    assert f"a0.h{top_prev}->a1.h{top_induction}<k>" in edges, sorted(edges)  # K-composition of the strongest pair
    key_edges = [tuple(parse_node(n) for n in parse_edge(e)) for e in edges if e.endswith("<k>")]
    for writer, reader in key_edges:  # every key edge in the circuit: previous-token head -> induction head
        assert writer.kind == "head" and writer.layer == 0 and writer.head in prev_heads, sorted(edges)
        assert reader.layer == 1 and reader.head in induction_heads, sorted(edges)
    assert {reader.head for _, reader in key_edges} == set(induction_heads), sorted(edges)  # each one fed


def test_eap_ig_tracks_exact_patching_better_than_eap(final_and_first):
    _, final, _ = final_and_first
    task = make_task("induction", final, n_examples=16)
    valid = GraphSpec.from_model(final).valid
    exact = score_edges(final, task, "patching")[valid]
    eap = score_edges(final, task, "eap")[valid]
    ig = score_edges(final, task, "eap-ig", ig_steps=30)[valid]
    rho_eap, rho_ig = _spearman(eap, exact), _spearman(ig, exact)
    print(f"rank correlation with exact patching: eap {rho_eap:.3f}, eap-ig(30) {rho_ig:.3f}")
    assert rho_ig > rho_eap and rho_ig > 0.6


def test_circuit_analysis_has_the_same_shapes_at_every_step(final_and_first):
    manifest, final, first = final_and_first
    task = make_task("induction", final, n_examples=8)
    out = []
    for step, model in ((manifest.steps[-1], final), (manifest.steps[0], first)):
        ctx = VisitContext(model=model, task=task, manifest=manifest, step=step, options={"method": "eap", "target": 0.8})
        out.append(circuit_analysis(ctx))
    keys = {"scores", "in_circuit", "faithfulness", "n_edges", "metric_clean", "metric_corrupted", "n_edges_total",
            "score_se", "inclusion", "resample_jaccard", "stable", "stable_faithfulness", "trust", "node_effects",
            "node_effects_se", "node_effects_exact"}
    for result in out:
        assert set(result) == keys
        assert result["scores"].dtype == np.float32 and result["in_circuit"].dtype == bool
        assert result["n_edges"] == int(result["in_circuit"].sum())
        assert result["n_edges_total"] == _attention_only_edges(final.cfg.n_layers, final.cfg.n_heads)
    heads = final.cfg.n_layers * final.cfg.n_heads
    # writers: the input and every head; readers: every head's q, k and v, and the logits
    assert out[0]["scores"].shape == out[1]["scores"].shape == GraphSpec.from_model(final).shape == (1 + heads, 3 * heads + 1)
    assert torch.isfinite(torch.tensor(out[0]["faithfulness"]))
