"""circuits.discovery on tiny real models: the functional forward, scorers, selection, faithfulness.

Oracles: the bridge's own forward (logits to 1e-4), TL 4.3's ``attribution_patch`` at edge
granularity (EAP parity to 1e-4), and a hand-written edge intervention through bridge hooks.
"""

import numpy as np
import pytest
import torch

from circuits.discovery import CircuitResult, discover, faithfulness, score_edges
from circuits.discovery import selection as sel
from circuits.discovery.faithfulness import Evaluator
from circuits.discovery.functional import FunctionalModel
from circuits.errors import CircuitsError
from circuits.graph import GraphSpec
from circuits.tasks import Task

VOCAB = 50


def _boot_neox(path, parallel=True, seed=0):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5,
                           use_parallel_residual=parallel)
    torch.manual_seed(seed)
    GPTNeoXForCausalLM(config).eval().save_pretrained(path)
    return TransformerBridge.boot_transformers(str(path), device="cpu").eval()


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A 2-layer GPTNeoX (partial rotary, parallel attention+MLP) booted from a local folder."""
    return _boot_neox(tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="module")
def native_mlp():
    """A native 1-layer model with a ReLU MLP and no LayerNorm (the modular-addition shape)."""
    from circuits.checkpoint import bridge_native_module, new_native_model

    cfg = {"d_model": 32, "n_layers": 1, "n_heads": 4, "d_head": 8, "d_mlp": 64, "n_ctx": 3, "d_vocab": 12,
           "d_vocab_out": 11, "attn_only": False, "normalization_type": None, "act_fn": "relu",
           "positional_embedding_type": "standard", "seed": 1}
    torch.manual_seed(1)
    return bridge_native_module(new_native_model(cfg), cfg, name="modadd-like")


@pytest.fixture(scope="module")
def native_attn():
    """A native 2-layer attention-only model with LayerNorm (the induction shape), untrained."""
    from circuits.checkpoint import bridge_native_module, new_native_model
    from circuits.recipes.induction import DEFAULTS, tl_config

    cfg = tl_config(dict(DEFAULTS))
    torch.manual_seed(2)
    return bridge_native_module(new_native_model(cfg), cfg, name="induction-like")


def _neox_task(n=6, pos=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, :4] = torch.randint(0, VOCAB, (n, 4), generator=gen)
    return Task("toy", clean, corrupted, torch.full((n, 1), -1), torch.full((n, 1), 3), torch.full((n, 1), 5))


@pytest.mark.parametrize("which", ["neox", "native_mlp", "native_attn"])
def test_functional_forward_reproduces_the_bridge(which, request):
    model = request.getfixturevalue(which)
    fm = FunctionalModel(model)
    tokens = torch.randint(0, int(model.cfg.d_vocab) - 1, (3, min(10, int(model.cfg.n_ctx))))
    with torch.no_grad():
        expected, got = model(tokens), fm.run(tokens).logits
    assert (expected - got).abs().max().item() <= 1e-4
    # ablating every edge with the same run's own outputs changes nothing
    run = fm.run(tokens)
    again = fm.run(tokens, ablate=torch.ones(fm.spec.shape), reference=run.writers).logits
    assert (again - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("which", ["neox", "native_mlp"])
def test_port_gradients_fast_path_equals_per_port_copies(which, request):
    """Shared LayerNorm + vjp (no ablation) gives the same port gradients as per-port copies."""
    model = request.getfixturevalue(which)
    fm = FunctionalModel(model)
    tokens = torch.randint(0, int(model.cfg.d_vocab) - 1, (3, min(10, int(model.cfg.n_ctx))))
    fast = fm.run(tokens, grad_ports=True)
    g_fast = fm.port_grads(fast, fast.logits[:, -1, 3].sum())
    slow = fm.run(tokens, grad_ports=True, ablate=torch.zeros(fm.spec.shape), reference=fast.writers.detach())
    g_slow = fm.port_grads(slow, slow.logits[:, -1, 3].sum())
    assert g_fast.shape == (fm.spec.n_backward, *tokens.shape, int(model.cfg.d_model))
    assert (g_fast - g_slow).abs().max().item() <= 1e-5 * max(1.0, g_slow.abs().max().item())


def test_spec_of_the_models(neox, native_mlp, native_attn):
    assert GraphSpec.from_model(neox) == GraphSpec(2, 4, has_mlp=True, parallel_attn_mlp=True)
    assert GraphSpec.from_model(native_mlp).has_mlp and not GraphSpec.from_model(native_attn).has_mlp


def _tl_edges_to_dense(spec, result):
    """TL's per-position edge dict -> our dense matrix, summed over positions."""
    def writer(node):
        return {"embed": "input", "attn_head_out": f"a{node.layer}.h{node.head}", "mlp_out": f"m{node.layer}"}[node.kind]

    def reader(node):
        if node.kind in ("q_input", "k_input", "v_input"):
            return f"a{node.layer}.h{node.head}<{node.kind[0]}>"
        return f"m{node.layer}" if node.kind == "mlp_in" else "logits"

    dense = np.zeros(spec.shape)
    for (u, v), score in result.edge_scores.items():
        dense[spec.forward_index(writer(u)), spec.backward_index(reader(v))] += score
    return dense


def test_eap_matches_tl_attribution_patch_at_edge_granularity(neox):
    from transformer_lens.tools.analysis.attribution_patching import (
        EdgeAttributionConfig,
        attribution_patch,
    )

    task = _neox_task(n=4)
    tl = attribution_patch(neox, task.clean, task.corrupted, lambda logits: logits[0, -1, 3] - logits[0, -1, 5],
                           EdgeAttributionConfig(granularity="edge"))
    spec = GraphSpec.from_model(neox)
    theirs = _tl_edges_to_dense(spec, tl)
    # TL denoises (gradient on the corrupted run, clean - corrupt): our eap with the prompts swapped
    swapped = Task("toy", task.corrupted, task.clean, task.answer_pos, task.correct, task.wrong)
    ours = score_edges(neox, swapped, "eap")
    assert not (theirs[~spec.valid] != 0).any()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"eap vs TL attribution_patch: max relative error {rel:.2e} over {spec.n_edges} edges")
    assert rel <= 1e-4
    # a writer's outgoing edges sum to its node score (TL's node granularity, summed over positions)
    nodes = attribution_patch(neox, task.clean, task.corrupted, lambda logits: logits[0, -1, 3] - logits[0, -1, 5],
                              EdgeAttributionConfig(granularity="node"))
    node_dense = np.zeros(spec.n_forward)
    for node, score in nodes.node_scores.items():
        name = {"embed": "input", "attn_head_out": f"a{node.layer}.h{node.head}", "mlp_out": f"m{node.layer}"}[node.kind]
        node_dense[spec.forward_index(name)] += score
    assert np.abs(ours.sum(1) - node_dense).max() <= 1e-4 * np.abs(node_dense).max()


def test_patching_one_edge_equals_a_hand_written_hook_intervention(neox):
    task = _neox_task(n=5, seed=3)
    spec = GraphSpec.from_model(neox)
    scores = score_edges(neox, task, "patching")
    writer, head_to = 2, 3  # edge a0.h1 -> a1.h3<k>
    i, j = spec.edge_index("a0.h1->a1.h3<k>")

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 5]).mean().item()

    neox.set_use_attn_result(True)
    neox.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, clean_cache = neox.run_with_cache(task.clean, names_filter="blocks.0.attn.hook_result")
            _, corrupt_cache = neox.run_with_cache(task.corrupted, names_filter="blocks.0.attn.hook_result")
            delta = (corrupt_cache["blocks.0.attn.hook_result"] - clean_cache["blocks.0.attn.hook_result"])[:, :, writer - 1]

            def patch_k(tensor, hook):
                tensor = tensor.clone()
                tensor[:, :, head_to] += delta
                return tensor

            base = metric(neox(task.clean))
            patched = metric(neox.run_with_hooks(task.clean, fwd_hooks=[("blocks.1.attn.hook_k_input", patch_k)]))
    finally:
        neox.set_use_split_qkv_input(False)
        neox.set_use_attn_result(False)
    assert patched != base
    assert scores[i, j] == pytest.approx(patched - base, abs=1e-5, rel=1e-4)


def _toy_modadd_task() -> Task:
    return Task("toy", torch.tensor([[1, 2, 11], [3, 4, 11], [5, 1, 11]]),
                torch.tensor([[5, 2, 11], [6, 4, 11], [2, 3, 11]]), torch.full((3, 1), 2),
                torch.tensor([[3], [7], [6]]), torch.tensor([[7], [9], [1]]))


def _metric_each(model, task: Task, hooks=()) -> np.ndarray:
    """The task's logit difference per example, from the bridge itself with TL hooks."""
    rows = torch.arange(task.n_examples)
    with torch.no_grad():
        logits = model.run_with_hooks(task.clean, fwd_hooks=list(hooks))[:, 2]
    return (logits[rows, task.correct[:, 0]] - logits[rows, task.wrong[:, 0]]).numpy()


def test_exact_node_effects_equal_hand_written_hook_interventions(native_mlp):
    task = _toy_modadd_task()
    effects = Evaluator(FunctionalModel(native_mlp), task).node_effects()
    spec = GraphSpec.from_model(native_mlp)
    assert effects.shape == (task.n_examples, spec.n_forward)
    with torch.no_grad():
        _, corrupt = native_mlp.run_with_cache(task.corrupted)
    base = _metric_each(native_mlp, task)

    def head_from_corrupt(z, hook, head=1):
        z[:, :, head] = corrupt["blocks.0.attn.hook_z"][:, :, head]
        return z

    def mlp_from_corrupt(out, hook):
        return corrupt["blocks.0.hook_mlp_out"]

    def embed_from_corrupt(x, hook):
        return corrupt[hook.name]

    checks = {"a0.h1": [("blocks.0.attn.hook_z", head_from_corrupt)],
              "m0": [("blocks.0.hook_mlp_out", mlp_from_corrupt)],
              "input": [("hook_embed", embed_from_corrupt), ("hook_pos_embed", embed_from_corrupt)]}
    for node, hooks in checks.items():
        want = _metric_each(native_mlp, task, hooks) - base
        assert np.abs(want).max() > 1e-3, node  # the check would be vacuous on a node with no effect
        np.testing.assert_allclose(effects[:, spec.forward_index(node)], want, atol=1e-5, err_msg=node)


def test_node_attribution_is_the_gradient_times_the_corruption_of_the_node(native_mlp):
    """Summing a writer's edge scores is EAP's node score: (z_corrupt - z_clean) . dM/dz, by autograd on the bridge."""
    task = _toy_modadd_task()
    result = discover(native_mlp, task, method="eap", node_effects="attribution")
    assert not result.node_effects_exact
    with torch.no_grad():
        _, clean = native_mlp.run_with_cache(task.clean)
        _, corrupt = native_mlp.run_with_cache(task.corrupted)
    z = clean["blocks.0.attn.hook_z"].clone().requires_grad_(True)
    metric = _metric_each_with_grad(native_mlp, task, z)
    (grad,) = torch.autograd.grad(metric.sum(), z)
    head = 2
    want = ((corrupt["blocks.0.attn.hook_z"] - clean["blocks.0.attn.hook_z"]) * grad)[:, :, head].sum((1, 2))
    got = result.node_effects[:, GraphSpec.from_model(native_mlp).forward_index(f"a0.h{head}")]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-4)


def _metric_each_with_grad(model, task: Task, z: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(task.n_examples)
    logits = model.run_with_hooks(task.clean, fwd_hooks=[("blocks.0.attn.hook_z", lambda _z, hook: z)])[:, 2]
    return logits[rows, task.correct[:, 0]] - logits[rows, task.wrong[:, 0]]


def test_node_effects_auto_is_exact_on_a_small_graph(native_mlp):
    task = _toy_modadd_task()
    result = discover(native_mlp, task, method="eap", node_effects="auto")
    assert result.node_effects_exact
    np.testing.assert_allclose(result.node_effects, Evaluator(FunctionalModel(native_mlp), task).node_effects())
    with pytest.raises(CircuitsError, match=r"--node-effects 'all': expected one of auto, exact, attribution"):
        discover(native_mlp, task, method="eap", node_effects="all")


def test_patching_sums_and_eap_ig_steps(native_attn):
    from circuits.tasks import induction_task

    task = induction_task(8, half_len=8, vocab=64)
    eap = score_edges(native_attn, task, "eap")
    ig1 = score_edges(native_attn, task, "eap-ig", ig_steps=1)
    spec = GraphSpec.from_model(native_attn)
    assert eap.dtype == np.float32 and eap.shape == spec.shape
    assert (eap[~spec.valid] == 0).all() and (ig1[~spec.valid] == 0).all()
    # one IG step evaluates the gradient at the clean input: exactly EAP
    np.testing.assert_allclose(ig1, eap, rtol=1e-4, atol=1e-6)
    # stacked IG steps give the same answer as one step and one example at a time
    from circuits.discovery.budget import Budget
    from circuits.discovery.scoring import score_eap_ig

    fm, one_at_a_time = FunctionalModel(native_attn), FunctionalModel(native_attn)
    one_at_a_time.budget = Budget(1)
    np.testing.assert_allclose(score_eap_ig(one_at_a_time, task, 4), score_eap_ig(fm, task, 4), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "patching"])
def test_each_examples_scores_equal_scoring_that_example_alone(native_attn, method):
    from circuits.discovery.scoring import score_edges_per_example
    from circuits.tasks import induction_task

    task = induction_task(4, half_len=6, vocab=64)
    per_example = score_edges_per_example(native_attn, task, method, ig_steps=3)
    assert per_example.shape == (4, *GraphSpec.from_model(native_attn).shape)
    for i in (0, 3):
        alone = score_edges(native_attn, task.slice(i, i + 1), method, ig_steps=3)
        np.testing.assert_allclose(per_example[i], alone, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(score_edges(native_attn, task, method, ig_steps=3), per_example.mean(0), rtol=1e-5, atol=1e-7)


def test_discover_bootstraps_and_measures_the_stable_circuit(native_attn):
    from circuits.tasks import induction_task

    task = induction_task(8, half_len=8, vocab=64)
    result = discover(native_attn, task, method="eap", resamples=6, gap_z=0.0)
    u = result.uncertainty
    assert u is not None and u.resample_jaccard.shape == (6,) and u.inclusion.shape == result.scores.shape
    assert not (u.stable & ~GraphSpec.from_model(native_attn).valid).any()
    assert u.stable_faithfulness == pytest.approx(float(faithfulness(native_attn, task, u.stable, gap_z=0.0)), abs=1e-5)
    with pytest.raises(CircuitsError, match="--resamples -1: expected a whole number"):
        discover(native_attn, task, method="eap", resamples=-1)


def test_selection_prune_greedy_threshold():
    spec = GraphSpec(2, 2, has_mlp=False)
    scores = np.zeros(spec.shape)
    f, b = spec.forward_index, spec.backward_index
    scores[f("input"), b("a0.h0<v>")] = -3.0
    scores[f("a0.h0"), b("a1.h1<k>")] = -2.0
    scores[f("a1.h1"), b("logits")] = 1.5
    scores[f("a0.h1"), b("a1.h0<q>")] = -2.5  # a1.h0 never reaches the logits: pruned
    top = sel.top_n(spec, scores, 4)
    assert set(spec.edge_names(top)) == {"input->a0.h0<v>", "a0.h0->a1.h1<k>", "a1.h1->logits"}
    assert sel.top_n(spec, scores, 4, pruned=False).sum() == 4
    assert (sel.threshold(spec, scores, 1.6) == sel.prune(spec, sel.threshold(spec, scores, 1.6, pruned=False))).all()
    assert sel.threshold(spec, scores, 1.6).sum() == 0  # the two edges above 1.6 connect to neither end
    grown = sel.greedy(spec, scores, 3)
    assert set(spec.edge_names(grown)) == {"input->a0.h0<v>", "a0.h0->a1.h1<k>", "a1.h1->logits"}
    mask = top.copy()
    sel.prune(spec, mask)
    assert (mask == top).all()  # prune does not change its input


def test_faithfulness_endpoints_and_search(native_attn):
    from circuits.tasks import induction_task

    task = induction_task(8, half_len=8, vocab=64)
    fm = FunctionalModel(native_attn)
    spec = fm.spec
    ev = Evaluator(fm, task, gap_z=0.0)  # an untrained model: its small gap is noise, but not nil
    everything, nothing = spec.valid, np.zeros(spec.shape, dtype=bool)
    assert ev.faithfulness(everything) == pytest.approx(1.0, abs=1e-4)
    assert ev.faithfulness(nothing) == pytest.approx(0.0, abs=1e-4)
    assert faithfulness(native_attn, task, everything, ablation="mean", gap_z=0.0) == pytest.approx(1.0, abs=1e-4)
    result = discover(native_attn, task, method="eap", target=0.5, gap_z=0.0)
    assert isinstance(result, CircuitResult) and result.reached and result.faithfulness >= 0.5
    assert result.n_edges == result.in_circuit.sum() <= result.n_edges_total == spec.n_edges
    assert result.to_digraph(only_circuit=True).number_of_edges() > 0
    unreachable = discover(native_attn, task, method="eap", target=1e3, scores=result.scores, gap_z=0.0)
    assert unreachable.reached is False and "no circuit" in unreachable.message
    assert np.isfinite(unreachable.faithfulness)


def test_nil_gap_is_reported_not_divided(native_attn):
    from circuits.tasks import induction_task

    task = induction_task(4, half_len=8, vocab=64)
    same = Task("same", task.clean, task.clean.clone(), task.answer_pos, task.correct)
    result = discover(native_attn, same, method="eap")
    assert result.gap_nil and np.isnan(result.faithfulness) and "nil metric gap" in result.message
    assert result.reached is False
    untrained = discover(native_attn, task, method="eap")  # clean and corrupted indistinguishable: nil too
    assert untrained.gap_nil and "standard errors" in untrained.message


def test_bad_input_is_refused_clearly(native_attn, native_mlp):
    from circuits.tasks import induction_task, ioi_task

    task = induction_task(4, half_len=8, vocab=64)
    with pytest.raises(CircuitsError, match="same shape"):
        Task("bad", task.clean, task.corrupted[:, :-1], task.answer_pos, task.correct)
    outside = Task("bad", task.clean, task.corrupted, task.answer_pos, task.correct + 100)
    with pytest.raises(CircuitsError, match="outside the model's vocabulary"):
        discover(native_attn, outside, method="eap")
    for steps in (0, -1, 2.5):
        with pytest.raises(CircuitsError, match="ig_steps >= 1"):
            discover(native_attn, task, method="eap-ig", ig_steps=steps)
    with pytest.raises(CircuitsError, match="--method .*expected one of eap, eap-ig, patching"):
        score_edges(native_attn, task, "acdc")
    with pytest.raises(CircuitsError, match="needs n_edges"):
        discover(native_attn, task, selection="topn")
    with pytest.raises(CircuitsError, match="model has none"):
        ioi_task(native_mlp)


def test_bench_discover_runs_small_and_agrees_with_tl(capsys):
    from circuits.bench.discover import bench_discover

    figures = bench_discover(n_pairs=2, seq_len=8, ig_steps=(2,), repeats=1, include_patching=True)
    assert figures["eap_vs_tl_max_rel_err"] <= 1e-4
    assert {"forward", "forward_backward", "eap", "eap-ig2", "patching", "tl_attribution_patch_edge"} <= set(figures["seconds"])
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["neox", "native_mlp", "native_attn"])
def test_replacing_a_writer_equals_ablating_every_edge_it_writes(which, request):
    """The node-effect path (one residual, writer outputs swapped) against the edge path (every
    reader port of the writer ablated, a residual per port)."""
    model = request.getfixturevalue(which)
    fm = FunctionalModel(model)
    tokens = torch.randint(0, int(model.cfg.d_vocab) - 1, (3, min(8, int(model.cfg.n_ctx))),
                           generator=torch.Generator().manual_seed(0))
    corrupted = torch.randint(0, int(model.cfg.d_vocab) - 1, tokens.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = fm.run(corrupted).writers
        rows = torch.eye(fm.spec.n_forward)
        by_edges = fm.run(tokens, ablate=rows[:, :, None].expand(-1, -1, fm.spec.n_backward), reference=reference)
        by_writers = fm.run(tokens, replace=rows, reference=reference)
    torch.testing.assert_close(by_writers.logits, by_edges.logits, atol=1e-5, rtol=1e-5)
