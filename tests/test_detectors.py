"""Head detectors: TL's head_detector as the oracle, hand-built patterns, the induction run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.detectors import (
    KINDS,
    detection_patterns,
    head_analysis,
    head_scores,
    pattern_scores,
    probe_tokens,
)


def _ctx(run_dir, step):
    import circuits
    from circuits.manifest import load_manifest
    from circuits.tasks import induction_task
    from circuits.visit import VisitContext

    manifest = load_manifest(run_dir)
    return VisitContext(circuits.load(manifest, step), induction_task(4), manifest, step)


@pytest.fixture(scope="module")
def final_ctx(induction_run):
    from circuits.manifest import load_manifest

    return _ctx(induction_run, load_manifest(induction_run).steps[-1])


def test_detection_patterns_match_tl():
    from transformer_lens import head_detector as hd

    tokens = torch.tensor([[0, 5, 7, 5, 9, 7, 5]])
    ours = detection_patterns(tokens)
    assert torch.equal(ours["previous_token"][0], hd.get_previous_token_head_detection_pattern(tokens))
    assert torch.equal(ours["duplicate_token"][0], hd.get_duplicate_token_head_detection_pattern(tokens))
    assert torch.equal(ours["induction"][0], hd.get_induction_head_detection_pattern(tokens))


def test_pattern_scores_hand_built():
    # A perfect previous-token head, and a uniform causal head, on 4 positions.
    prev = torch.zeros(4, 4)
    prev[0, 0] = 1
    prev[1:, :-1] = torch.eye(3)
    uniform = torch.ones(4, 4).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    patterns = torch.stack([prev, uniform])[None]  # [batch head q k]
    target = detection_patterns(torch.tensor([[0, 1, 2, 3]]))["previous_token"]
    ours = pattern_scores(patterns, target)
    assert ours[0].item() == pytest.approx(1.0)
    assert ours[1].item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert pattern_scores(patterns, target, rows="all")[0].item() == pytest.approx(3 / 4)


def test_scores_agree_with_tl_head_detector(final_ctx):
    """Our 'all rows' score is TL's detect_head 'mul' score, head by head, on the same prompts."""
    from transformer_lens import head_detector as hd

    model = final_ctx.model
    tokens = probe_tokens(model, n_examples=3, half_len=15)  # TL needs seq_len < n_ctx
    names = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
             "induction": "induction_head"}

    class OneSequence:  # detect_head tokenizes a string; hand it our token ids instead
        def __init__(self, seq):
            self.cfg, self.seq = model.cfg, seq

        def to_tokens(self, _):
            return self.seq

        def run_with_cache(self, *args, **kwargs):
            return model.run_with_cache(*args, **kwargs)

    patterns = torch.stack([model.run_with_cache(tokens)[1][f"blocks.{layer}.attn.hook_pattern"]
                            for layer in range(model.cfg.n_layers)])  # [layer batch head q k]
    targets = detection_patterns(tokens)
    for kind, tl_name in names.items():
        tl = torch.stack([hd.detect_head(OneSequence(tokens[i : i + 1]), "unused", tl_name)
                          for i in range(len(tokens))]).mean(0)
        ours = torch.stack([pattern_scores(p, targets[kind], rows="all") for p in patterns])
        torch.testing.assert_close(ours, tl.to(ours.dtype), atol=1e-5, rtol=1e-5)


def test_head_analysis_shapes_and_range(final_ctx):
    result = head_analysis(final_ctx)
    assert set(result) == set(KINDS)
    for kind, value in result.items():
        assert value.shape == (2, 4), kind
        assert value.dtype == np.float32
        assert np.all((value >= 0) & (value <= 1)), kind


def test_induction_scores_rise_over_training(induction_run, final_ctx):
    start = head_scores(_ctx(induction_run, 0).model)
    end = head_scores(final_ctx.model)
    assert start["induction"].max() < 0.2
    assert start["previous_token"].max() < 0.2
    assert end["induction"].max() > 0.5
    # The induction head's OV circuit copies the token it attends to.
    layer, head = np.unravel_index(int(end["induction"].argmax()), end["induction"].shape)
    assert end["copying"][layer, head] > 0.5


def test_layer0_has_a_previous_token_head_and_layer1_an_induction_head(final_ctx):
    # That the one feeds the other (K-composition) is checked on the discovered circuit, in
    # test_discovery_induction.py::test_final_circuit_has_previous_token_head_feeding_induction_head_key.
    end = head_scores(final_ctx.model)
    assert end["induction"][1].max() > 0.5
    assert end["previous_token"][0].max() > 0.5


def test_ov_scores_need_no_tokenizer(final_ctx):
    assert getattr(final_ctx.model, "tokenizer", None) is None
    scores = head_scores(final_ctx.model, n_examples=2, half_len=4)
    for kind in ("successor", "copy_suppression", "copying"):
        assert torch.isfinite(scores[kind]).all()


def test_probe_tokens_avoid_bos(final_ctx):
    tokens = probe_tokens(final_ctx.model, n_examples=50, half_len=16)
    assert tokens.shape == (50, 33)
    assert (tokens[:, 0] == 0).all() and (tokens[:, 1:] != 0).all()
    assert torch.equal(tokens[:, 1:17], tokens[:, 17:])
    assert tokens.max() < 64
