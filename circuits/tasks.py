"""Tasks: clean and corrupted prompts aligned by position, answer tokens, and a metric.

A task is data, not code: token tensors plus where the answers are read. The metric turns a
model's logits into one number per example (higher = the task is done better); circuit
discovery explains the gap between the clean and the corrupted metric.

Answers come in *slots*: ``answer_pos[b, j]`` is where slot ``j`` of example ``b`` is read,
``correct[b, j]`` its correct token, or with a third dimension ``correct[b, j, :]`` a set of
correct tokens padded with ``PAD`` (-1); ``wrong`` likewise. A slot whose correct tokens are
all ``PAD`` is padding (rows with fewer answer positions); the metric averages the real slots.
Prompts of different lengths are right-padded to one length, their real lengths in
``lengths`` (causal attention never lets a real position read a later pad, so the metric,
which reads only answer positions, is exact). Task files: ``circuits.task_files``.

Metrics (per slot, then averaged over the real slots of an example):

- ``logit_diff``: mean logit of the correct tokens - mean logit of the wrong ones (without
  ``wrong``: - the mean logit over the vocabulary);
- ``logit_diff_max``: mean correct logit - the *largest* wrong logit (without ``wrong``: the
  largest logit of any token not correct), "correct minus the best wrong answer";
- ``logprob``: log of the probability of the correct set, ``log sum_c p(c)``;
- ``prob_diff``: ``sum p(correct) - sum p(wrong)`` (EAP-IG's greater-than metric);
- ``kl``: minus KL(clean || this run) at the answer positions;
- a callable (or the name of one registered with :func:`register_metric`):
  ``fn(answer_logits [batch n_ans vocab], task, clean_answer_logits | None) -> [batch]``,
  differentiable in the logits; studies record it by name.

Define your own in a few lines::

    task = Task(name="my-task", clean=clean_ids, corrupted=corrupt_ids,
                answer_pos=torch.full((n, 1), -1), correct=good_ids[:, None], wrong=bad_ids[:, None])
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from circuits.errors import CircuitsError

Metric = Literal["logit_diff", "logit_diff_max", "logprob", "prob_diff", "kl"]
METRIC_NAMES: tuple[str, ...] = ("logit_diff", "logit_diff_max", "logprob", "prob_diff", "kl")
PAD = -1  # pads answer sets and answer slots; never a token id (answer_pos -1 still means the last position)

# (answer logits [batch n_ans vocab], the task, the clean run's answer logits or None) -> [batch]
MetricFn = Callable[[Tensor, "Task", "Tensor | None"], Tensor]
METRICS: dict[str, MetricFn] = {}


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn(answer_logits, task, clean_answer_logits) -> [batch]`` as metric ``name``:
    ``Task(metric=name)`` or ``Task(metric=fn)`` then use it, and a study records ``name``."""
    if not isinstance(name, str) or not name or name in METRIC_NAMES:
        raise CircuitsError(f"metric name {name!r}: expected a new non-empty name (built-in: {', '.join(METRIC_NAMES)})")

    def decorate(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return decorate


@dataclass(frozen=True)
class UnavailableMetric:
    """A user metric named by a stored study but not registered in this process: the task's
    arrays stay readable, computing the metric says what to do."""

    name: str

    def __call__(self, *args: Any) -> Tensor:
        raise CircuitsError(f"metric {self.name!r} is a user function not registered in this process; register it "
                            f"with circuits.tasks.register_metric({self.name!r}) before computing the metric")


def metric_name(metric: str | MetricFn) -> str:
    """The name a study records: a built-in or registered name, else ``module.qualname``."""
    if isinstance(metric, str):
        return metric
    if isinstance(metric, UnavailableMetric):
        return metric.name
    for name, fn in METRICS.items():
        if fn is metric:
            return name
    return f"{getattr(metric, '__module__', '?')}.{getattr(metric, '__qualname__', type(metric).__name__)}"


def answer_sets(ids: Int[Tensor, "batch n_ans"] | Int[Tensor, "batch n_ans k"]) -> Int[Tensor, "batch n_ans k"]:
    """Answers as sets: a 2-D ``correct``/``wrong`` holds one token per slot."""
    return ids[..., None] if ids.ndim == 2 else ids


def _int_tensor(task_name: str, label: str, tensor: Any) -> Tensor:
    if not isinstance(tensor, Tensor) or tensor.dtype.is_floating_point or tensor.dtype.is_complex \
            or tensor.dtype == torch.bool:
        got = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
        raise CircuitsError(f"task {task_name}: {label} must be an integer tensor (token ids or "
                            f"positions), got {got}")
    return tensor.to(torch.int64)  # indexing and gather take int64


@dataclass(frozen=True)
class Task:
    """Prompts and answers of one task; ``answer_pos`` indexes ``clean`` positions (-1 = last).

    ``wrong`` may be None: the metric is then the correct token's logit minus the mean logit
    (for tasks such as induction, where a corrupted prompt predicts nothing in particular).
    ``lengths`` (None: every prompt fills all positions) gives each row's real length when
    the prompts are right-padded.
    """

    name: str
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, "batch n_ans"]
    correct: Int[Tensor, "batch n_ans"] | Int[Tensor, "batch n_ans k"]
    wrong: Int[Tensor, "batch n_ans"] | Int[Tensor, "batch n_ans k"] | None = None
    metric: str | MetricFn = "logit_diff"
    prompts: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    lengths: Int[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name.splitlines() != [self.name]:
            raise CircuitsError(f"task name {self.name!r}: expected a non-empty string on one line")
        for label in ("clean", "corrupted", "answer_pos", "correct", "wrong", "lengths"):
            tensor = getattr(self, label)
            if tensor is not None or label not in ("wrong", "lengths"):
                object.__setattr__(self, label, _int_tensor(self.name, label, tensor))
        if self.clean.shape != self.corrupted.shape:
            raise CircuitsError(
                f"task {self.name}: clean prompts {tuple(self.clean.shape)} and corrupted prompts "
                f"{tuple(self.corrupted.shape)} must have the same shape (aligned by position)"
            )
        if self.clean.ndim != 2 or 0 in self.clean.shape:
            raise CircuitsError(f"task {self.name}: prompts must be a non-empty [batch, pos] tensor, "
                                f"got shape {tuple(self.clean.shape)}")
        if self.answer_pos.ndim != 2 or self.answer_pos.shape[-1] == 0:
            raise CircuitsError(f"task {self.name}: answer_pos must be a [batch, n_ans] tensor with n_ans >= 1, "
                                f"got shape {tuple(self.answer_pos.shape)}")
        self._check_answers()
        self._check_lengths()
        self._check_metric()

    def _check_answers(self) -> None:
        shape = (self.clean.shape[0], self.answer_pos.shape[-1])
        if tuple(self.answer_pos.shape) != shape:
            raise CircuitsError(f"task {self.name}: answer_pos has shape {tuple(self.answer_pos.shape)}, expected {shape}")
        for label, tensor in (("correct", self.correct), ("wrong", self.wrong)):
            if tensor is None:
                continue
            if tuple(tensor.shape[:2]) != shape or tensor.ndim not in (2, 3) or 0 in tensor.shape:
                raise CircuitsError(f"task {self.name}: {label} has shape {tuple(tensor.shape)}, expected {shape} "
                                    f"(one token per answer) or {shape[0], shape[1], 'k'} (sets padded with {PAD})")
            if tensor.numel() and tensor.min() < PAD:
                raise CircuitsError(f"task {self.name}: {label} holds {int(tensor.min())}; token ids are >= 0 and "
                                    f"{PAD} pads a set")
        real = answer_mask(self)
        empty = (~real.any(-1)).nonzero()
        if len(empty):
            raise CircuitsError(f"task {self.name}: example {int(empty[0])} has no answer (all its correct tokens are {PAD})")
        if self.wrong is not None:
            no_wrong = (real & ~(answer_sets(self.wrong) != PAD).any(-1)).nonzero()
            if len(no_wrong):
                b, j = (int(i) for i in no_wrong[0])
                raise CircuitsError(f"task {self.name}: example {b}, answer {j} has correct tokens but no wrong one "
                                    f"(all {PAD}); give one, or no wrong answers for the whole task")

    def _check_lengths(self) -> None:
        if self.lengths is None:
            return
        if tuple(self.lengths.shape) != (self.n_examples,) or self.lengths.min() < 1 or self.lengths.max() > self.seq_len:
            raise CircuitsError(f"task {self.name}: lengths must be [{self.n_examples}] real prompt lengths in "
                                f"1..{self.seq_len}, got {tuple(self.lengths.shape)}")
        absolute = self.answer_pos % self.seq_len
        beyond = (answer_mask(self) & (absolute >= self.lengths[:, None])).nonzero()
        if len(beyond):
            b, j = (int(i) for i in beyond[0])
            raise CircuitsError(f"task {self.name}: example {b} reads answer {j} at position {int(absolute[b, j])}, "
                                f"in its padding (its prompt has {int(self.lengths[b])} tokens)")

    def _check_metric(self) -> None:
        metric = self.metric
        if callable(metric) or metric in METRIC_NAMES or metric in METRICS:
            return
        registered = f"; registered: {', '.join(sorted(METRICS))}" if METRICS else ""
        raise CircuitsError(f"task {self.name}: metric {metric!r} unknown; expected {', '.join(METRIC_NAMES)}, "
                            f"a callable or a name given to register_metric{registered}")

    @property
    def n_examples(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    @property
    def metric_name(self) -> str:
        return metric_name(self.metric)

    @property
    def is_padded(self) -> bool:
        """Whether some prompt is shorter than ``seq_len`` (right-padded)."""
        return self.lengths is not None and bool((self.lengths < self.seq_len).any())

    def real_positions(self) -> Bool[Tensor, "batch pos"]:
        """True where a prompt has a real token, False in its right padding."""
        if self.lengths is None:
            return torch.ones(self.clean.shape, dtype=torch.bool)
        return torch.arange(self.seq_len)[None, :] < self.lengths[:, None]

    def prompt_hash(self) -> str:
        """Identifies the prompts and answers: studies refuse to mix different ones."""
        digest = hashlib.sha256(self.name.encode())
        for tensor in (self.clean, self.corrupted, self.answer_pos, self.correct, self.wrong):
            if tensor is not None:
                digest.update(tensor.to(torch.int64).cpu().numpy().tobytes())
        digest.update(self.metric_name.encode())
        if self.lengths is not None:  # only then: unpadded tasks keep the hashes they always had
            digest.update(b"lengths" + self.lengths.cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_fits(self, d_vocab: int, n_ctx: int, d_vocab_out: int | None = None) -> None:
        """Refuse prompts the model cannot take, before any forward pass."""
        d_vocab_out = d_vocab_out or d_vocab
        if self.seq_len > n_ctx:
            raise CircuitsError(f"task {self.name}: prompts have {self.seq_len} tokens, the model's context is {n_ctx}")
        for label, tensor, limit in (("clean", self.clean, d_vocab), ("corrupted", self.corrupted, d_vocab),
                                     ("correct", self.correct, d_vocab_out), ("wrong", self.wrong, d_vocab_out)):
            ids = None if tensor is None else tensor[tensor != PAD] if label in ("correct", "wrong") else tensor
            if ids is not None and ids.numel() and (ids.min() < 0 or ids.max() >= limit):
                raise CircuitsError(
                    f"task {self.name}: {label} token ids span {int(ids.min())}..{int(ids.max())}, "
                    f"outside the model's vocabulary 0..{limit - 1}"
                )
        if self.answer_pos.min() < -self.seq_len or self.answer_pos.max() >= self.seq_len:
            raise CircuitsError(f"task {self.name}: answer_pos outside the {self.seq_len} prompt positions")

    def slice(self, start: int, stop: int) -> Task:
        """Examples ``start:stop`` (for batching), same metric and name."""
        wrong = None if self.wrong is None else self.wrong[start:stop]
        lengths = None if self.lengths is None else self.lengths[start:stop]
        return Task(self.name, self.clean[start:stop], self.corrupted[start:stop], self.answer_pos[start:stop],
                    self.correct[start:stop], wrong, self.metric, self.prompts[start:stop], self.options, lengths)

    def repeat(self, k: int) -> Task:
        """The examples ``k`` times over, as stacked interventions run them (same metric)."""
        if k == 1:
            return self

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat(k, *([1] * (t.ndim - 1)))

        return Task(self.name, self.clean.repeat(k, 1), self.corrupted.repeat(k, 1), self.answer_pos.repeat(k, 1),
                    self.correct.repeat(k, *([1] * (self.correct.ndim - 1))), rep(self.wrong), self.metric,
                    lengths=rep(self.lengths))


def check_model_fits(model, task: Task) -> None:
    """Refuse a task the model cannot take (vocabulary, context; padding on a bidirectional model)."""
    cfg = model.cfg
    d_vocab_out = getattr(cfg, "d_vocab_out", -1)
    task.check_fits(int(cfg.d_vocab), int(cfg.n_ctx), int(d_vocab_out) if d_vocab_out and d_vocab_out > 0 else None)
    if task.is_padded and getattr(cfg, "attention_dir", "causal") == "bidirectional":
        raise CircuitsError(f"task {task.name}: its prompts are right-padded, which is exact only for causal "
                            "models, and this model attends both ways; give prompts of one token length")


def answer_mask(task: Task) -> Bool[Tensor, "batch n_ans"]:
    """True at the real answer slots (a slot whose correct tokens are all PAD is padding)."""
    return (answer_sets(task.correct) != PAD).any(-1)


def at_answer_positions(task: Task) -> tuple[Tensor, Task]:
    """The positions the metric reads (sorted, unique), and the task re-indexed to logits
    taken only there: unembedding only those positions gives the very same metric."""
    absolute = task.answer_pos % task.seq_len
    positions = torch.unique(absolute)
    # lengths dropped: the re-indexed task reads logits at ``positions`` only, never padding
    return positions, dataclasses.replace(task, answer_pos=torch.searchsorted(positions, absolute), lengths=None)


def answer_logits(logits: Float[Tensor, "batch pos vocab"], task: Task) -> Float[Tensor, "batch n_ans vocab"]:
    pos = task.answer_pos.to(logits.device) % logits.shape[1]
    return logits[torch.arange(logits.shape[0], device=logits.device)[:, None], pos]


# ---------------------------------------------------------------- metrics
# Each reduces the answer sets of a slot, then the real slots of an example. With one token per
# slot and no padding every reduction is the identity, and the slot mean a plain mean: the
# built-in tasks' metrics are bit for bit what they were before sets existed.


def _gather(values: Float[Tensor, "batch n_ans vocab"], ids: Tensor) -> tuple[Tensor, Tensor]:
    """Values of the tokens of each set [batch n_ans k], and which entries are real.

    An empty set (in a padded slot) reads token 0, so every value, and every gradient, stays
    finite; its slot is masked afterwards.
    """
    sets = answer_sets(ids).to(values.device)
    real = sets != PAD
    real[..., 0] |= ~real.any(-1)
    return values.gather(-1, sets.clamp(min=0)), real


def _masked_mean(values: Tensor, real: Tensor) -> Tensor:
    """Mean over the last dimension of the entries ``real`` marks (a set's tokens, an example's slots)."""
    if bool(real.all()):
        return values.mean(-1)
    return values.masked_fill(~real, 0.0).sum(-1) / real.sum(-1)


def _set_max(values: Tensor, real: Tensor) -> Tensor:
    return values.masked_fill(~real, float("-inf")).amax(-1)


def _set_sum(values: Tensor, real: Tensor) -> Tensor:
    return values.masked_fill(~real, 0.0).sum(-1)


def _best_other(at: Float[Tensor, "batch n_ans vocab"], correct: Tensor) -> Float[Tensor, "batch n_ans"]:
    """The largest logit of a token outside the correct set."""
    sets = answer_sets(correct).to(at.device)
    hits = torch.zeros(at.shape, dtype=torch.long, device=at.device)
    hits.scatter_add_(-1, sets.clamp(min=0), (sets != PAD).long())  # add, not assign: PAD entries add 0 at token 0
    return at.masked_fill(hits > 0, float("-inf")).amax(-1)


def _per_slot(at: Float[Tensor, "batch n_ans vocab"], task: Task,
              clean_at: Float[Tensor, "batch n_ans vocab"] | None) -> Float[Tensor, "batch n_ans"]:
    metric = task.metric
    if metric in ("logit_diff", "logit_diff_max"):
        good = _masked_mean(*_gather(at, task.correct))
        if task.wrong is None:
            return good - (at.mean(-1) if metric == "logit_diff" else _best_other(at, task.correct))
        return good - (_masked_mean if metric == "logit_diff" else _set_max)(*_gather(at, task.wrong))
    if metric == "logprob":
        values, real = _gather(at.log_softmax(-1), task.correct)
        return values.masked_fill(~real, float("-inf")).logsumexp(-1)
    if metric == "prob_diff":
        probs = at.softmax(-1)
        good = _set_sum(*_gather(probs, task.correct))
        return good if task.wrong is None else good - _set_sum(*_gather(probs, task.wrong))
    if clean_at is None:
        raise CircuitsError(f"task {task.name}: the kl metric needs the clean run's logits")
    ref = clean_at.log_softmax(-1)
    return -(ref.exp() * (ref - at.log_softmax(-1))).sum(-1)


def metric_per_example(
    logits: Float[Tensor, "batch pos vocab"],
    task: Task,
    clean_logits: Float[Tensor, "batch pos vocab"] | None = None,
) -> Float[Tensor, " batch"]:
    """The task metric per example, averaged over its real answer slots (see the module's
    docstring for each metric). ``kl`` needs ``clean_logits``; higher is always better."""
    at = answer_logits(logits, task)
    clean_at = None if clean_logits is None else answer_logits(clean_logits, task)
    metric = task.metric if callable(task.metric) else METRICS.get(task.metric)
    if metric is not None:
        return _user_metric(metric, at, task, clean_at)
    return _masked_mean(_per_slot(at, task, clean_at), answer_mask(task).to(at.device))


def _user_metric(fn: MetricFn, at: Tensor, task: Task, clean_at: Tensor | None) -> Float[Tensor, " batch"]:
    value = fn(at, task, clean_at)
    if not isinstance(value, Tensor) or tuple(value.shape) != (at.shape[0],):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise CircuitsError(f"task {task.name}: metric {task.metric_name} returned {got}, expected a tensor of "
                            f"shape ({at.shape[0]},): one value per example")
    return value


def loss_at_answers(at: Float[Tensor, "batch n_ans vocab"], task: Task) -> Float[Tensor, " batch"]:
    """Per example: minus the log-probability of the correct answer set, averaged over real slots."""
    values, real = _gather(at.log_softmax(-1), task.correct)
    logprob = values.masked_fill(~real, float("-inf")).logsumexp(-1)
    return -_masked_mean(logprob, answer_mask(task).to(at.device))


# ---------------------------------------------------------------- lean answer logits
# A shard keeps, at each answer slot, only what the built-in metrics read: the logits of the
# correct and wrong tokens, the log-sum-exp and the mean over the vocabulary. Full-vocabulary
# logits were ~80% of a Pythia-160m shard (docs/storage.md). From these every built-in metric
# but two comes back: kl needs both runs' whole distributions, and logit_diff_max without
# ``wrong`` the largest logit outside the correct set; user metrics read the whole vocabulary.


@dataclass(frozen=True)
class LeanLogits:
    """What a lean shard keeps of one run's answer logits (``outputs/*_{clean,corrupted}``).

    NaN marks what is not an answer: a set entry that is ``PAD``, and every value of a padded
    slot (one whose correct tokens are all ``PAD``).
    """

    correct: Float[Tensor, "batch n_ans k"]
    lse: Float[Tensor, "batch n_ans"]  # log-sum-exp of the logits over the vocabulary
    mean_logit: Float[Tensor, "batch n_ans"]  # mean logit over the vocabulary
    wrong: Float[Tensor, "batch n_ans k2"] | None = None  # only when the task has wrong answers


def lean_logits(at: Float[Tensor, "batch n_ans vocab"], task: Task) -> LeanLogits:
    """The lean arrays of answer logits ``at`` (as ``answer_logits`` gives them), same dtype."""
    slots = answer_mask(task).to(at.device)

    def tokens_of(ids: Tensor) -> Tensor:
        values, _ = _gather(at, ids)
        real = (answer_sets(ids) != PAD).to(at.device) & slots[..., None]
        return values.masked_fill(~real, float("nan"))

    wrong = None if task.wrong is None else tokens_of(task.wrong)
    return LeanLogits(correct=tokens_of(task.correct), lse=at.logsumexp(-1).masked_fill(~slots, float("nan")),
                      mean_logit=at.mean(-1).masked_fill(~slots, float("nan")), wrong=wrong)


def lean_metric(lean: LeanLogits, task: Task) -> Float[Tensor, " batch"]:
    """``task``'s metric per example recomputed from lean arrays (``metric_per_example`` on the
    full logits gives the same, up to the arrays' dtype); refuses metrics they cannot give."""
    name = task.metric_name
    if name not in METRIC_NAMES or name == "kl" or (name == "logit_diff_max" and task.wrong is None):
        why = ("the largest logit outside the correct set" if name == "logit_diff_max"
               else "the whole vocabulary's logits")
        raise CircuitsError(f"task {task.name}: metric {name!r} reads {why}, which lean shards do not keep; sweep "
                            "with --keep-logits and compute it from outputs/logits_clean and outputs/logits_corrupted")
    if (task.wrong is None) != (lean.wrong is None):
        raise CircuitsError(f"task {task.name}: the lean arrays {'lack' if lean.wrong is None else 'have'} wrong "
                            "logits, the task " + ("has wrong answers" if task.wrong is not None else "has none"))
    correct, real = _lean_set(lean.correct, task.correct)
    wrong_sets = None if lean.wrong is None or task.wrong is None else _lean_set(lean.wrong, task.wrong)
    lse = lean.lse.float()[..., None]
    if name in ("logit_diff", "logit_diff_max"):
        if wrong_sets is None:
            slot = _masked_mean(correct, real) - lean.mean_logit.float()
        else:
            slot = _masked_mean(correct, real) - (_masked_mean if name == "logit_diff" else _set_max)(*wrong_sets)
    elif name == "logprob":
        slot = _lean_logprob(correct, real, lse)
    else:  # prob_diff
        slot = _set_sum((correct - lse).exp(), real)
        if wrong_sets is not None:
            slot = slot - _set_sum((wrong_sets[0] - lse).exp(), wrong_sets[1])
    return _masked_mean(slot, answer_mask(task).to(slot.device))


def lean_loss(lean: LeanLogits, task: Task) -> Float[Tensor, " batch"]:
    """The answer loss per example (as ``loss_at_answers``) from the correct logits and the lse."""
    correct, real = _lean_set(lean.correct, task.correct)
    logprob = _lean_logprob(correct, real, lean.lse.float()[..., None])
    return -_masked_mean(logprob, answer_mask(task).to(logprob.device))


def _lean_set(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Stored set values as float32, and which entries are tokens (the task's sets, not the NaNs)."""
    real = (answer_sets(ids) != PAD).to(values.device)
    return values.float().nan_to_num(0.0), real  # padding reads 0, then is masked: no NaN leaks


def _lean_logprob(correct: Tensor, real: Tensor, lse: Tensor) -> Tensor:
    """log sum_c p(c) per slot: log p(c) = logit(c) - lse."""
    return (correct - lse).masked_fill(~real, float("-inf")).logsumexp(-1)


# ---------------------------------------------------------------- built-in tasks


def induction_task(n_examples: int = 32, half_len: int = 16, vocab: int = 64, seed: int = 0) -> Task:
    """Repeated random tokens; the corrupted prompt replaces the first half by other tokens.

    Answers: every token of the repeated half after its first (predictable only by induction).
    """
    from circuits.recipes.induction import BOS

    gen = torch.Generator().manual_seed(1_000 + seed)
    half = torch.randint(1, vocab, (n_examples, half_len), generator=gen)
    other = (half + torch.randint(1, vocab - 1, half.shape, generator=gen) - 1) % (vocab - 1) + 1
    bos = torch.full((n_examples, 1), BOS, dtype=torch.long)
    clean = torch.cat([bos, half, half], dim=1)
    corrupted = torch.cat([bos, other, half], dim=1)
    # Position half_len + i (the i-th repeated token, i >= 1) predicts half[:, i].
    positions = torch.arange(half_len + 1, 2 * half_len)
    answer_pos = positions.expand(n_examples, -1).clone()
    correct = half[:, 1:]
    return Task("induction", clean, corrupted, answer_pos, correct, None,
                options={"half_len": half_len, "vocab": vocab, "seed": seed})


def modular_addition_task(p: int, n_examples: int = 64, seed: int = 0) -> Task:
    """``a b =`` -> (a+b) mod p; the corrupted prompt changes ``a`` (a different answer)."""
    gen = torch.Generator().manual_seed(2_000 + seed)
    a = torch.randint(0, p, (n_examples,), generator=gen)
    b = torch.randint(0, p, (n_examples,), generator=gen)
    a2 = (a + torch.randint(1, p, (n_examples,), generator=gen)) % p
    eq = torch.full_like(a, p)
    clean = torch.stack([a, b, eq], dim=1)
    corrupted = torch.stack([a2, b, eq], dim=1)
    answer_pos = torch.full((n_examples, 1), 2)
    return Task("modular-addition", clean, corrupted, answer_pos, ((a + b) % p)[:, None], ((a2 + b) % p)[:, None],
                options={"p": p, "seed": seed})


TaskFactory = Callable[..., Task]
TASKS: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Register ``factory(model, n_examples, seed) -> Task`` under ``name`` for the CLI."""

    def decorate(factory: TaskFactory) -> TaskFactory:
        TASKS[name] = factory
        return factory

    return decorate


@register_task("induction")
def _induction_for(model, n_examples: int = 32, seed: int = 0) -> Task:
    cfg = model.cfg
    half_len = (cfg.n_ctx - 1) // 2
    return induction_task(n_examples, half_len=min(half_len, 16), vocab=cfg.d_vocab, seed=seed)


@register_task("modular-addition")
def _modadd_for(model, n_examples: int = 64, seed: int = 0) -> Task:
    p = model.cfg.d_vocab - 1
    return modular_addition_task(p, n_examples, seed)


def make_task(name: str, model, n_examples: int | None = None, seed: int = 0) -> Task:
    """Build a registered task for ``model`` (its vocabulary, context and tokenizer)."""
    if name not in TASKS:
        raise CircuitsError(f"unknown task {name!r}; expected one of: {', '.join(sorted(TASKS))}, "
                            "or a task file (.jsonl or .csv, circuits.task_files)")
    kwargs = {"seed": seed} if n_examples is None else {"n_examples": n_examples, "seed": seed}
    task = TASKS[name](model, **kwargs)
    check_model_fits(model, task)
    return task


# ---------------------------------------------------------------- tasks on real language models
# IOI (Wang et al. 2023) and greater-than (Hanna et al. 2023), templated with the model's own
# tokenizer. Names, nouns and two-digit years must each be one token so that clean and
# corrupted prompts align by position; candidates that are not are skipped.

IOI_TEMPLATES = (
    "When {IO} and {S} went to the store, {S} gave a drink to",
    "When {IO} and {S} went to the park, {S} gave a ball to",
    "After {IO} and {S} went to the office, {S} handed a book to",
    "Then, {S} and {IO} had a long argument, and afterwards {S} said to",
    "While {S} and {IO} were working at the garden, {S} gave a flower to",
)
IOI_NAMES = (
    "Mary", "John", "Alice", "Bob", "James", "Michael", "Sarah", "David", "Emma", "Daniel",
    "Laura", "Robert", "Anna", "Thomas", "Lisa", "Paul", "Kevin", "Susan", "Mark", "Jessica",
)
GREATER_THAN_TEMPLATE = "The {noun} lasted from the year {century}{yy} to the year {century}"
GREATER_THAN_NOUNS = (
    "war", "expedition", "contract", "drought", "pilgrimage", "siege", "reign", "voyage", "dynasty", "truce",
)


def _require_tokenizer(model, task: str):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise CircuitsError(
            f"task {task} builds its prompts with the model's tokenizer, and this model has none "
            "(built-in runs have their own vocabularies: use the induction or modular-addition task)"
        )
    return tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _single_token(tokenizer, text: str) -> int | None:
    ids = _encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def _bos_prefix(model, tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if getattr(model.cfg, "default_prepend_bos", False) and bos is not None else []


def _fill_ioi(template: str, io: str, s1: str, s2: str) -> str:
    first, middle, last = template.split("{S}")
    return (first + s1 + middle + s2 + last).replace("{IO}", io)


def ioi_task(model, n_examples: int = 32, seed: int = 0) -> Task:
    """Indirect object identification: "When Mary and John went to the store, John gave a drink to" -> Mary.

    Corrupted prompts (ABC) use three other names, so nothing points at either answer;
    metric: logit(IO) - logit(S) at the last position.
    """
    tokenizer = _require_tokenizer(model, "ioi")
    names = [(name, tok) for name in IOI_NAMES if (tok := _single_token(tokenizer, " " + name)) is not None]
    if len(names) < 5:
        raise CircuitsError(f"task ioi needs at least 5 names that are one token each; this tokenizer has {len(names)}")
    gen = torch.Generator().manual_seed(3_000 + seed)
    bos = _bos_prefix(model, tokenizer)
    by_len: dict[int, list] = {}
    for i in range(n_examples * len(IOI_TEMPLATES) * 2):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        pick = torch.randperm(len(names), generator=gen)[:5].tolist()
        (io, io_tok), (s, s_tok), (c, _), (d, _), (e, _) = (names[j] for j in pick)
        clean_text = _fill_ioi(template, io, s, s)
        corrupt_text = _fill_ioi(template, c, d, e)
        clean, corrupt = bos + _encode(tokenizer, clean_text), bos + _encode(tokenizer, corrupt_text)
        if len(clean) != len(corrupt):
            continue
        by_len.setdefault(len(clean), []).append((clean, corrupt, io_tok, s_tok, clean_text))
    group = max(by_len.values(), key=len) if by_len else []
    if len(group) < n_examples:
        raise CircuitsError(f"task ioi: only {len(group)} aligned prompts of one length, {n_examples} asked for")
    group = group[:n_examples]
    return Task(
        "ioi", torch.tensor([g[0] for g in group]), torch.tensor([g[1] for g in group]),
        torch.full((n_examples, 1), -1), torch.tensor([[g[2]] for g in group]), torch.tensor([[g[3]] for g in group]),
        prompts=tuple(g[4] for g in group), options={"seed": seed},
    )


def greater_than_task(model, n_examples: int = 32, seed: int = 0, century: int = 17, k: int = 8) -> Task:
    """Greater-than: "The war lasted from the year 1732 to the year 17" -> a year after 32.

    Corrupted prompts start at year 01 (as Hanna et al. 2023). The metric is the mean logit
    of the ``k`` two-digit years just above YY minus that of the ``k`` years up to YY
    (``n_ans = k`` answer pairs read at the last position).
    """
    tokenizer = _require_tokenizer(model, "greater-than")
    yy_tokens = {yy: _single_token(tokenizer, f"{yy:02d}") for yy in range(100)}
    nouns = [noun for noun in GREATER_THAN_NOUNS if _single_token(tokenizer, " " + noun) is not None]
    if not nouns or any(yy_tokens[yy] is None for yy in range(100)):
        raise CircuitsError("task greater-than needs every two-digit year 00..99 and a noun to be one token each in this tokenizer")
    gen = torch.Generator().manual_seed(4_000 + seed)
    bos = _bos_prefix(model, tokenizer)
    rows = []
    for i in range(n_examples):
        noun = nouns[i % len(nouns)]
        yy = int(torch.randint(k + 2, 100 - k, (1,), generator=gen))
        before, after = GREATER_THAN_TEMPLATE.split("{yy}")
        head = bos + _encode(tokenizer, before.format(noun=noun, century=century))
        tail = _encode(tokenizer, after.format(century=century))
        clean = head + [yy_tokens[yy]] + tail
        corrupt = head + [yy_tokens[1]] + tail
        correct = [yy_tokens[y] for y in range(yy + 1, yy + 1 + k)]
        wrong = [yy_tokens[y] for y in range(yy - k + 1, yy + 1)]
        rows.append((clean, corrupt, correct, wrong, f"{before.format(noun=noun, century=century)}{yy:02d}{after.format(century=century)}"))
    if len({len(r[0]) for r in rows}) != 1:
        raise CircuitsError("task greater-than: the nouns tokenize to different lengths; prompts would not align")
    return Task(
        "greater-than", torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
        torch.full((n_examples, k), -1), torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows]),
        prompts=tuple(r[4] for r in rows), options={"seed": seed, "century": century, "k": k},
    )


@register_task("ioi")
def _ioi_for(model, n_examples: int = 32, seed: int = 0) -> Task:
    return ioi_task(model, n_examples, seed)


@register_task("greater-than")
def _greater_than_for(model, n_examples: int = 32, seed: int = 0) -> Task:
    return greater_than_task(model, n_examples, seed)
