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
from circuits.tasks import Metric, Task, answer_logits, metric_per_example

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
    assert set(typing.get_args(Metric)) == {"logit_diff", "prob_diff", "kl"}  # a new metric needs a case below


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
