"""Discovery under a memory budget: chunked computations equal unchunked ones, and a small
budget bounds a step's peak memory where the unchunked code would need far more.

Oracle for equality: the same computation with every example and copy stacked in one forward
(a budget larger than anything here). "One at a time" is ``Budget(1)``: one example and one
copy (IG step, ablated circuit, writer) per forward.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from circuits.config import MAX_MEMORY_DEFAULT
from circuits.discovery import discover
from circuits.discovery.budget import Budget, Chunks, make_budget
from circuits.discovery.faithfulness import Evaluator
from circuits.discovery.functional import FunctionalModel
from circuits.discovery.scoring import score_edges_per_example
from circuits.errors import CircuitsError
from circuits.tasks import Task

VOCAB = 50
UNBOUNDED = Budget(2**50)


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A 2-layer GPTNeoX (partial rotary, parallel attention + MLP) booted from a local folder."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    path = tmp_path_factory.mktemp("neox")
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).eval().save_pretrained(path)
    return TransformerBridge.boot_transformers(str(path), device="cpu").eval()


def _task(n: int = 7, pos: int = 10, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, :4] = torch.randint(0, VOCAB, (n, 4), generator=gen)
    answer_pos = torch.tensor([[pos - 1, pos - 3]]).repeat(n, 1)  # two slots per example
    return Task("toy", clean, corrupted, answer_pos, torch.randint(0, VOCAB, (n, 2), generator=gen),
                torch.randint(0, VOCAB, (n, 2), generator=gen))


def _models(model) -> tuple[FunctionalModel, FunctionalModel]:
    """(unbounded, one at a time) views of the same model."""
    whole, tight = FunctionalModel(model), FunctionalModel(model)
    whole.budget, tight.budget = UNBOUNDED, Budget(1)
    return whole, tight


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(b).max())))


# ------------------------------------------------------------------ the plan


def test_a_plan_stacks_every_example_before_any_copy():
    assert Budget(1000).plan(per_unit=10, n_examples=8, n_copies=50) == Chunks(examples=8, copies=12)


def test_a_plan_splits_examples_evenly_when_one_copy_of_all_does_not_fit():
    assert Budget(70).plan(per_unit=10, n_examples=8, n_copies=3) == Chunks(examples=4, copies=1)


def test_a_plan_never_goes_below_one_example_and_one_copy():
    assert Budget(1).plan(per_unit=10**9, n_examples=8, n_copies=3, per_example=10**9) == Chunks(1, 1)


def test_a_plan_counts_what_each_example_holds_whatever_its_copies():
    assert Budget(1000).plan(per_unit=10, n_examples=4, n_copies=100, per_example=150) == Chunks(4, 10)


def test_the_default_budget_is_at_most_2_gib_and_half_the_free_memory():
    budget = make_budget(None, "cpu")
    assert 0 < budget.bytes <= MAX_MEMORY_DEFAULT


def test_max_memory_reads_sizes_in_words():
    assert make_budget("1.5GiB", "cpu").bytes == 3 * 2**29
    assert make_budget("800MB", "cpu").bytes == 800 * 10**6


@pytest.mark.parametrize("bad", ["lots", "0.5KB", "2 XB", -1])
def test_a_bad_max_memory_is_refused_by_name(bad):
    with pytest.raises(CircuitsError, match=r"^--max-memory .*expected a size of at least 1 MiB"):
        make_budget(bad, "cpu")


# ------------------------------------------------------------------ chunked == unchunked


@pytest.mark.parametrize("method", ["eap", "eap-ig", "patching"])
def test_chunked_edge_scores_equal_unchunked(neox, method):
    whole, tight = _models(neox)
    task = _task()
    _close(score_edges_per_example(tight, task, method, ig_steps=3), score_edges_per_example(whole, task, method, 3))


@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_chunked_ablated_metrics_equal_unchunked(neox, ablation):
    whole, tight = _models(neox)
    task = _task()
    rng = np.random.default_rng(0)
    circuits = rng.random((5, *whole.spec.shape)) < 0.5
    # the metrics with everything outside each circuit ablated (faithfulness divides them by the gap)
    got = Evaluator(tight, task, ablation, gap_z=0.0).metrics(circuits)
    _close(got, Evaluator(whole, task, ablation, gap_z=0.0).metrics(circuits))


def test_chunked_node_effects_equal_unchunked(neox):
    whole, tight = _models(neox)
    task = _task()
    _close(Evaluator(tight, task).node_effects(), Evaluator(whole, task).node_effects())


def test_a_chunked_discovery_finds_the_same_circuit(neox):
    whole, tight = _models(neox)
    task = _task(n=9, seed=3)
    ours = discover(tight, task, method="eap-ig", ig_steps=3, gap_z=0.0, resamples=4, node_effects="exact")
    theirs = discover(whole, task, method="eap-ig", ig_steps=3, gap_z=0.0, resamples=4, node_effects="exact")
    # (their tried sizes go further up the grid: one forward evaluated all of it at once)
    assert (ours.in_circuit == theirs.in_circuit).all() and ours.size == theirs.size
    assert ours.faithfulness == pytest.approx(theirs.faithfulness, rel=1e-5)  # a ratio: float32 rounding over the gap
    _close(ours.scores, theirs.scores)
    _close(ours.node_effects, theirs.node_effects)


def test_a_repeated_circuit_is_measured_once(neox):
    evaluator = Evaluator(FunctionalModel(neox), _task(), gap_z=0.0)
    mask = np.random.default_rng(1).random(evaluator.fm.spec.shape) < 0.5
    calls = []
    measure = evaluator.ablator.metrics
    evaluator.ablator.metrics = lambda masks: calls.append(len(masks)) or measure(masks)  # type: ignore[method-assign]
    first = evaluator.faithfulness(np.stack([mask, mask]))
    again = evaluator.faithfulness(mask)
    assert calls == [1] and first[0] == first[1] == again


def test_the_full_and_the_empty_circuit_need_no_forward(neox):
    evaluator = Evaluator(FunctionalModel(neox), _task(), gap_z=0.0)
    evaluator.ablator.metrics = None  # type: ignore[assignment] # any forward would fail
    valid = evaluator.fm.spec.valid
    assert evaluator.faithfulness(np.stack([valid, ~valid])).tolist() == [1.0, 0.0]


# ------------------------------------------------------------------ peak memory, in a fresh process

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformer_lens.model_bridge import TransformerBridge
from circuits.discovery import FunctionalModel, discover
from circuits.tasks import induction_task

folder, max_memory = sys.argv[1], sys.argv[2]
model = TransformerBridge.boot_transformers(folder, device="cpu").eval()
task = induction_task(n_examples=48, half_len=16, vocab=512, seed=0)
fm = FunctionalModel(model)  # its weights and self-check before the measurement: the same in both runs

def rss_mb(key):
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key))

before = rss_mb("VmRSS:")
result = discover(fm, task, method="eap-ig", ig_steps=5, gap_z=0.0, resamples=2, node_effects="exact",
                  max_memory=max_memory)
spec = result.spec  # the corrupted run's writer outputs, kept whole for the step
kept = spec.n_forward * task.n_examples * task.seq_len * int(model.cfg.d_model) * 4 / 2**20
print(json.dumps({"before": before, "peak": rss_mb("VmHWM:"), "edges": int(result.n_edges), "kept": kept}))
"""


def _peak_rise(folder, max_memory: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), max_memory], capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_small_budget_bounds_the_peak_memory_of_a_discovery_the_unbounded_code_would_exceed(tmp_path):
    """48 prompts x 33 tokens, EAP-IG(5), exact node effects, on a 4-layer d256 GPTNeoX: stacked
    whole, its working set is several hundred MB; under a 64 MiB budget it stays within the
    budget plus what a step keeps whole (the corrupted run's writer outputs, 60 MB here)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                           intermediate_size=1024, max_position_embeddings=64, rotary_pct=0.25)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).eval().save_pretrained(tmp_path)
    unbounded, bounded = _peak_rise(tmp_path, "1000GB"), _peak_rise(tmp_path, "64MiB")
    unbounded_rise, bounded_rise = unbounded["peak"] - unbounded["before"], bounded["peak"] - bounded["before"]
    bound = 64 + bounded["kept"] + 96  # + per-example scores, the bootstrap, what the allocator holds on to
    assert unbounded_rise > 2 * bound, unbounded
    assert bounded_rise < bound, bounded
    assert bounded["edges"] == unbounded["edges"]
