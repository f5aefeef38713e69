"""Task metrics (circuits/tasks.py) on tiny hand-made logits whose answers are known in closed form.

Each expected value is written out by hand (logs of small integers) or computed here with numpy,
never with the helpers under test.
"""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch

from circuits.errors import CircuitsError
from circuits.tasks import METRIC_NAMES, Metric, Task, answer_logits, metric_per_example

LN2, LN3 = math.log(2), math.log(3)
# At the answer position: logits (0, ln 2, ln 3), so softmax = (1, 2, 3) / 6.
ROW = [0.0, LN2, LN3]


def _task(metric: str, answer_pos, correct, wrong, seq_len: int = 3) -> Task:
    n = len(answer_pos)
    tokens = torch.zeros(n, seq_len, dtype=torch.long)
    return Task("tiny", tokens, tokens.clone(), torch.tensor(answer_pos), torch.tensor(correct),
                None if wrong is None else torch.tensor(wrong), metric=metric)


def _one_position(row, pos: int = 2, seq_len: int = 3) -> torch.Tensor:
    """[1, seq_len, 3] logits: ``row`` at ``pos``, garbage (large, distinct) elsewhere."""
    logits = torch.tensor([[[50.0, -50.0, 7.0]] * seq_len])
    logits[0, pos] = torch.tensor(row)
    return logits


def test_every_metric_is_covered_here():
    # a new metric needs a case below (and one in test_metric_on_answer_sets_by_hand)
    assert set(typing.get_args(Metric)) == {"logit_diff", "logit_diff_max", "logprob", "prob_diff", "kl"}
    assert set(METRIC_NAMES) == set(typing.get_args(Metric))


@pytest.mark.parametrize(("metric", "wrong", "want"), [
    ("logit_diff", [[0]], LN3),                          # ln 3 - 0
    ("logit_diff", None, LN3 - (LN2 + LN3) / 3),         # ln 3 - mean(0, ln 2, ln 3) = ln 3 - ln 6 / 3
    ("prob_diff", [[0]], 3 / 6 - 1 / 6),                 # p(2) - p(0)
    ("prob_diff", [[1]], 3 / 6 - 2 / 6),                 # p(2) - p(1)
    ("prob_diff", None, 3 / 6),                          # p(2) alone
], ids=["logit_diff", "logit_diff-no-wrong", "prob_diff", "prob_diff-wrong-1", "prob_diff-no-wrong"])
def test_metric_on_one_answer_by_hand(metric, wrong, want):
    task = _task(metric, [[-1]], [[2]], wrong)  # -1: the last of 3 positions
    got = metric_per_example(_one_position(ROW), task)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_kl_metric_by_hand():
    # clean p = (1, 2, 3) / 6, this run q = uniform (1/3 each):
    # KL(p || q) = 1/6 ln(1/2) + 2/6 ln(1) + 3/6 ln(3/2); the metric is its negative.
    want = -(1 / 6 * math.log(1 / 2) + 3 / 6 * math.log(3 / 2))
    task = _task("kl", [[2]], [[2]], None)
    got = metric_per_example(_one_position([5.0, 5.0, 5.0]), task, clean_logits=_one_position(ROW))
    assert got.item() == pytest.approx(want, abs=1e-6)
    same = metric_per_example(_one_position(ROW), task, clean_logits=_one_position(ROW))
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # identical to the clean run: no divergence
    with pytest.raises(CircuitsError, match="the kl metric needs the clean run's logits"):
        metric_per_example(_one_position(ROW), task)


def _numpy_metric(metric, logits, answer_pos, correct, wrong, clean=None):
    """The metric, written independently in numpy: per example, mean over answer positions."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    out = []
    for b in range(logits.shape[0]):
        values = []
        for j, pos in enumerate(answer_pos[b]):
            row = logits[b, pos]
            c = correct[b][j]
            if metric == "logit_diff":
                values.append(row[c] - (row.mean() if wrong is None else row[wrong[b][j]]))
            elif metric == "prob_diff":
                p = np.exp(log_softmax(row))
                values.append(p[c] - (0.0 if wrong is None else p[wrong[b][j]]))
            else:
                lp, lq = log_softmax(clean[b, pos]), log_softmax(row)
                values.append(-(np.exp(lp) * (lp - lq)).sum())
        out.append(np.mean(values))
    return np.array(out)


@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff", "kl"])
@pytest.mark.parametrize("with_wrong", [True, False], ids=["wrong", "no-wrong"])
def test_metric_averages_over_answer_positions_like_numpy(metric, with_wrong):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    clean = rng.normal(size=(3, 5, 7)).astype(np.float32)
    answer_pos = [[1, -1], [0, 3], [4, 2]]  # -1 is the last position (4)
    correct = [[2, 6], [0, 1], [5, 5]]
    wrong = [[3, 0], [1, 1], [0, 4]] if with_wrong else None
    want = _numpy_metric(metric, logits, [[p % 5 for p in row] for row in answer_pos], correct, wrong, clean)
    task = _task(metric, answer_pos, correct, wrong, seq_len=5)
    got = metric_per_example(torch.tensor(logits), task, clean_logits=torch.tensor(clean))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_answer_logits_reads_the_answer_positions():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    task = _task("logit_diff", [[0, -1], [2, 1]], [[0, 0], [0, 0]], None, seq_len=4)
    got = answer_logits(logits, task)
    assert got.shape == (2, 2, 3)
    np.testing.assert_array_equal(got[0, 1].numpy(), [9, 10, 11])   # example 0, position 3
    np.testing.assert_array_equal(got[1, 0].numpy(), [18, 19, 20])  # example 1, position 2


# ---------------------------------------------------------------- answer sets, padding, new metrics

LN5_6 = math.log(5 / 6)


@pytest.mark.parametrize(("metric", "correct", "wrong", "want"), [
    ("logit_diff", [2], [0, 1], LN3 - LN2 / 2),            # ln 3 - mean(0, ln 2)
    ("logit_diff", [1, 2], [0], (LN2 + LN3) / 2),          # mean(ln 2, ln 3) - 0
    ("logit_diff_max", [2], [0, 1], LN3 - LN2),            # ln 3 - max(0, ln 2)
    ("logit_diff_max", [1, 2], [0], (LN2 + LN3) / 2),      # the correct side is a mean
    ("logit_diff_max", [2], None, LN3 - LN2),              # best token not correct: 1
    ("logit_diff_max", [1], None, LN2 - LN3),              # best token not correct: 2
    ("logprob", [2], None, math.log(3 / 6)),               # ln p(2)
    ("logprob", [1, 2], [0], LN5_6),                       # ln (p(1) + p(2)); wrong plays no part
    ("prob_diff", [1, 2], [0], 5 / 6 - 1 / 6),             # sum p(correct) - sum p(wrong)
    ("prob_diff", [0], [1, 2], 1 / 6 - 5 / 6),
    ("prob_diff", [1, 2], None, 5 / 6),
    ("logit_diff", [2, -1, -1], [0, 1, -1], LN3 - LN2 / 2),  # -1 pads a set: the same as [2] vs [0, 1]
    ("logit_diff_max", [2, -1], [-1, 0], LN3),
    ("logprob", [-1, 2], None, math.log(3 / 6)),
    ("prob_diff", [2, -1], [-1, 1], 3 / 6 - 2 / 6),
], ids=lambda v: str(v))
def test_metric_on_answer_sets_by_hand(metric, correct, wrong, want):
    k = max(len(correct), len(wrong or []))
    def padded(ids):
        return [[ids + [-1] * (k - len(ids))]]  # one example, one slot, a set of k

    task = _task(metric, [[-1]], padded(correct), None if wrong is None else padded(wrong))
    assert task.correct.ndim == 3
    got = metric_per_example(_one_position(ROW), task)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_a_padded_answer_slot_is_left_out_of_the_mean():
    # Example 0 reads two slots (ln 3 - 0 at position 2, ln 2 - 0 at position 1); example 1
    # reads only its first, its second slot being padding (correct -1, wrong -1).
    logits = torch.tensor([[[50.0, -50.0, 7.0], ROW, ROW]] * 2)
    logits[:, 1] = torch.tensor([0.0, LN2, 9.0])
    task = _task("logit_diff", [[2, 1], [2, 0]], [[2, 1], [2, -1]], [[0, 0], [0, -1]])
    got = metric_per_example(logits, task)
    np.testing.assert_allclose(got.numpy(), [(LN3 + LN2) / 2, LN3], rtol=1e-6)


def test_kl_ignores_padded_slots():
    task = _task("kl", [[2, 0]], [[2, -1]], None)  # slot 1 is padding: its position 0 holds garbage
    clean = _one_position(ROW)
    got = metric_per_example(_one_position([5.0, 5.0, 5.0]), task, clean_logits=clean)
    want = -(1 / 6 * math.log(1 / 2) + 3 / 6 * math.log(3 / 2))
    assert got.item() == pytest.approx(want, abs=1e-6)


def _old_metric(logits, task, clean_logits=None):
    """The metric exactly as it was written before answer sets (2-D answers only)."""
    at = answer_logits(logits, task)
    correct = task.correct[..., None]
    if task.metric == "logit_diff":
        good = at.gather(-1, correct)[..., 0]
        bad = at.mean(-1) if task.wrong is None else at.gather(-1, task.wrong[..., None])[..., 0]
        return (good - bad).mean(-1)
    if task.metric == "prob_diff":
        probs = at.softmax(-1)
        good = probs.gather(-1, correct)[..., 0]
        if task.wrong is None:
            return good.mean(-1)
        return (good - probs.gather(-1, task.wrong[..., None])[..., 0]).mean(-1)
    ref = answer_logits(clean_logits, task).log_softmax(-1)
    return -(ref.exp() * (ref - at.log_softmax(-1))).sum(-1).mean(-1)


@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff", "kl"])
@pytest.mark.parametrize("with_wrong", [True, False], ids=["wrong", "no-wrong"])
def test_one_token_answers_give_bit_for_bit_the_metric_they_always_had(metric, with_wrong):
    from circuits.tasks import induction_task, modular_addition_task

    gen = torch.Generator().manual_seed(3)
    for task in (induction_task(4, half_len=5, vocab=11), modular_addition_task(7, 6)):
        wrong = task.wrong if with_wrong and task.wrong is not None else None
        task = Task(task.name, task.clean, task.corrupted, task.answer_pos, task.correct, wrong, metric)
        logits = torch.randn(*task.clean.shape, 12, generator=gen)
        clean = torch.randn(*task.clean.shape, 12, generator=gen)
        assert torch.equal(metric_per_example(logits, task, clean), _old_metric(logits, task, clean))


def test_unpadded_tasks_keep_their_prompt_hash():
    """The hash as it was computed before sets, lengths and user metrics."""
    import hashlib

    from circuits.tasks import modular_addition_task

    task = modular_addition_task(7, 6)
    digest = hashlib.sha256(task.name.encode())
    for tensor in (task.clean, task.corrupted, task.answer_pos, task.correct, task.wrong):
        digest.update(tensor.numpy().tobytes())
    digest.update(b"logit_diff")
    assert task.prompt_hash() == digest.hexdigest()[:16]


@pytest.mark.parametrize("metric", ["logit_diff", "logit_diff_max", "logprob", "prob_diff", "kl"])
@pytest.mark.parametrize("with_wrong", [True, False], ids=["wrong", "no-wrong"])
def test_every_metric_is_differentiable_with_sets_and_padding(metric, with_wrong):
    """EAP differentiates the metric: torch's gradcheck against finite differences, in float64."""
    correct = [[[2, 5, -1], [-1, -1, -1]], [[1, -1, -1], [3, 4, 6]]]  # example 0: its second slot is padding
    wrong = [[[0, -1], [-1, -1]], [[0, 2], [5, -1]]] if with_wrong else None
    task = _task(metric, [[1, 0], [-1, 2]], correct, wrong, seq_len=4)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    clean = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: metric_per_example(x, task, clean_logits=clean), (logits,))
    (grad,) = torch.autograd.grad(metric_per_example(logits, task, clean_logits=clean).sum(), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_user_metric_is_called_with_answer_logits_and_recorded_by_name():
    from circuits.tasks import METRICS, metric_name, register_metric

    def top_logit(at, task, clean_at):  # the largest logit at the first answer position
        return at[:, 0].amax(-1)

    task = _task("logit_diff", [[-1]], [[2]], None)
    mine = Task("mine", task.clean, task.corrupted, task.answer_pos, task.correct, metric=top_logit)
    assert metric_per_example(_one_position(ROW), mine).item() == pytest.approx(LN3)
    assert mine.metric_name == f"{__name__}.test_a_user_metric_is_called_with_answer_logits_and_recorded_by_name.<locals>.top_logit"
    register_metric("top-logit")(top_logit)
    try:
        assert metric_name(top_logit) == "top-logit"
        by_name = Task("mine", task.clean, task.corrupted, task.answer_pos, task.correct, metric="top-logit")
        assert metric_per_example(_one_position(ROW), by_name).item() == pytest.approx(LN3)
        assert by_name.prompt_hash() == Task("mine", task.clean, task.corrupted, task.answer_pos, task.correct,
                                             metric=top_logit).prompt_hash()
    finally:
        METRICS.pop("top-logit")


def test_user_metric_errors_are_one_line():
    from circuits.tasks import UnavailableMetric, register_metric

    task = _task("logit_diff", [[-1]], [[2]], None)
    scalar = Task("t", task.clean, task.corrupted, task.answer_pos, task.correct, metric=lambda at, t, c: at.sum())
    with pytest.raises(CircuitsError, match=r"returned \(\), expected a tensor of shape \(1,\)"):
        metric_per_example(_one_position(ROW), scalar)
    gone = Task("t", task.clean, task.corrupted, task.answer_pos, task.correct, metric=UnavailableMetric("mine"))
    assert gone.metric_name == "mine"
    with pytest.raises(CircuitsError, match=r"register_metric\('mine'\)"):
        metric_per_example(_one_position(ROW), gone)
    with pytest.raises(CircuitsError, match="metric 'accuracy' unknown"):
        Task("t", task.clean, task.corrupted, task.answer_pos, task.correct, metric="accuracy")
    with pytest.raises(CircuitsError, match="expected a new non-empty name"):
        register_metric("kl")


@pytest.mark.parametrize(("correct", "wrong", "lengths", "pattern"), [
    ([[[-1, -1]]], None, None, "example 0 has no answer"),
    ([[[2, -1]]], [[[-1]]], None, "example 0, answer 0 has correct tokens but no wrong one"),
    ([[[2, -3]]], None, None, "correct holds -3"),
    ([[2]], None, [2], "example 0 reads answer 0 at position 2, in its padding"),
    ([[2]], None, [4], r"lengths must be \[1\] real prompt lengths in 1..3"),
])
def test_bad_answer_sets_and_lengths_are_refused(correct, wrong, lengths, pattern):
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(CircuitsError, match=pattern):
        Task("t", tokens, tokens, torch.tensor([[-1]]), torch.tensor(correct),
             None if wrong is None else torch.tensor(wrong), lengths=None if lengths is None else torch.tensor(lengths))


def test_a_stored_task_with_sets_lengths_and_a_user_metric_reads_back():
    from circuits.store import task_from_record
    from circuits.tasks import METRICS, UnavailableMetric, register_metric
    from circuits.visit import task_record

    tokens = torch.tensor([[1, 2, 3], [4, 5, 0]])
    register_metric("margin-test")(lambda at, t, c: at[:, 0, 0])
    try:
        task = Task("mine", tokens, tokens.flip(1), torch.tensor([[2], [1]]), torch.tensor([[[2, -1]], [[1, 0]]]),
                    torch.tensor([[[0]], [[2]]]), metric="margin-test", lengths=torch.tensor([3, 2]))
        record = json_roundtrip(task_record(task))
        assert record["metric"] == "margin-test" and record["padded"]
        back = task_from_record(record)
        assert back.prompt_hash() == task.prompt_hash() and back.lengths.tolist() == [3, 2]
        assert torch.equal(back.correct, task.correct) and back.metric == "margin-test"
    finally:
        METRICS.pop("margin-test")
    unregistered = task_from_record(record)  # the arrays read; the metric says what it needs
    assert isinstance(unregistered.metric, UnavailableMetric) and unregistered.prompt_hash() == task.prompt_hash()
    with pytest.raises(CircuitsError, match=r"register_metric\('margin-test'\)"):
        metric_per_example(torch.zeros(2, 3, 4), unregistered)


def json_roundtrip(record):
    import json

    return json.loads(json.dumps(record))
