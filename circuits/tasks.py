"""Tasks: clean and corrupted prompts aligned by position, answer tokens, and a metric.

A task is data, not code: token tensors plus where the answers are read. The metric turns a
model's logits into one number per example (higher = the task is done better); circuit
discovery explains the gap between the clean and the corrupted metric.

Define your own in a few lines::

    task = Task(name="my-task", clean=clean_ids, corrupted=corrupt_ids,
                answer_pos=torch.full((n, 1), -1), correct=good_ids[:, None], wrong=bad_ids[:, None])
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.errors import CircuitsError

Metric = Literal["logit_diff", "prob_diff", "kl"]


@dataclass(frozen=True)
class Task:
    """Prompts and answers of one task; ``answer_pos`` indexes ``clean`` positions (-1 = last).

    ``wrong`` may be None: the metric is then the correct token's logit minus the mean logit
    (for tasks such as induction, where a corrupted prompt predicts nothing in particular).
    """

    name: str
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, "batch n_ans"]
    correct: Int[Tensor, "batch n_ans"]
    wrong: Int[Tensor, "batch n_ans"] | None = None
    metric: Metric = "logit_diff"
    prompts: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name.splitlines() != [self.name]:
            raise CircuitsError(f"task name {self.name!r}: expected a non-empty string on one line")
        for label in ("clean", "corrupted", "answer_pos", "correct", "wrong"):
            tensor = getattr(self, label)
            if tensor is None and label == "wrong":
                continue
            if not isinstance(tensor, Tensor) or tensor.dtype.is_floating_point or tensor.dtype.is_complex \
                    or tensor.dtype == torch.bool:
                got = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
                raise CircuitsError(f"task {self.name}: {label} must be an integer tensor (token ids or "
                                    f"positions), got {got}")
            if tensor.dtype != torch.int64:  # indexing and gather take int64
                object.__setattr__(self, label, tensor.to(torch.int64))
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
        shape = (self.clean.shape[0], self.answer_pos.shape[-1])
        for label, tensor in (("answer_pos", self.answer_pos), ("correct", self.correct), ("wrong", self.wrong)):
            if tensor is not None and tuple(tensor.shape) != shape:
                raise CircuitsError(f"task {self.name}: {label} has shape {tuple(tensor.shape)}, expected {shape}")
        if self.metric not in ("logit_diff", "prob_diff", "kl"):
            raise CircuitsError(f"task {self.name}: metric {self.metric!r} unknown; expected logit_diff, prob_diff or kl")

    @property
    def n_examples(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def prompt_hash(self) -> str:
        """Identifies the prompts and answers: studies refuse to mix different ones."""
        digest = hashlib.sha256(self.name.encode())
        for tensor in (self.clean, self.corrupted, self.answer_pos, self.correct, self.wrong):
            if tensor is not None:
                digest.update(tensor.to(torch.int64).cpu().numpy().tobytes())
        digest.update(self.metric.encode())
        return digest.hexdigest()[:16]

    def check_fits(self, d_vocab: int, n_ctx: int, d_vocab_out: int | None = None) -> None:
        """Refuse prompts the model cannot take, before any forward pass."""
        d_vocab_out = d_vocab_out or d_vocab
        if self.seq_len > n_ctx:
            raise CircuitsError(f"task {self.name}: prompts have {self.seq_len} tokens, the model's context is {n_ctx}")
        for label, tensor, limit in (("clean", self.clean, d_vocab), ("corrupted", self.corrupted, d_vocab),
                                     ("correct", self.correct, d_vocab_out), ("wrong", self.wrong, d_vocab_out)):
            if tensor is not None and (tensor.min() < 0 or tensor.max() >= limit):
                raise CircuitsError(
                    f"task {self.name}: {label} token ids span {int(tensor.min())}..{int(tensor.max())}, "
                    f"outside the model's vocabulary 0..{limit - 1}"
                )
        if self.answer_pos.min() < -self.seq_len or self.answer_pos.max() >= self.seq_len:
            raise CircuitsError(f"task {self.name}: answer_pos outside the {self.seq_len} prompt positions")

    def slice(self, start: int, stop: int) -> Task:
        """Examples ``start:stop`` (for batching), same metric and name."""
        wrong = None if self.wrong is None else self.wrong[start:stop]
        return Task(self.name, self.clean[start:stop], self.corrupted[start:stop], self.answer_pos[start:stop],
                    self.correct[start:stop], wrong, self.metric, self.prompts[start:stop], self.options)


def at_answer_positions(task: Task) -> tuple[Tensor, Task]:
    """The positions the metric reads (sorted, unique), and the task re-indexed to logits
    taken only there: unembedding only those positions gives the very same metric."""
    absolute = task.answer_pos % task.seq_len
    positions = torch.unique(absolute)
    return positions, dataclasses.replace(task, answer_pos=torch.searchsorted(positions, absolute))


def answer_logits(logits: Float[Tensor, "batch pos vocab"], task: Task) -> Float[Tensor, "batch n_ans vocab"]:
    pos = task.answer_pos.to(logits.device) % logits.shape[1]
    return logits[torch.arange(logits.shape[0], device=logits.device)[:, None], pos]


def metric_per_example(
    logits: Float[Tensor, "batch pos vocab"],
    task: Task,
    clean_logits: Float[Tensor, "batch pos vocab"] | None = None,
) -> Float[Tensor, " batch"]:
    """The task metric per example, averaged over answer positions.

    logit_diff: logit(correct) - logit(wrong), or - mean logit when there is no wrong answer.
    prob_diff: p(correct) - p(wrong) (or p(correct) alone).
    kl: minus KL(clean || this run) at the answer positions (needs ``clean_logits``), so that,
    as for the others, higher means closer to the clean behaviour.
    """
    at = answer_logits(logits, task)
    correct = task.correct.to(at.device)[..., None]
    if task.metric == "logit_diff":
        good = at.gather(-1, correct)[..., 0]
        bad = at.mean(-1) if task.wrong is None else at.gather(-1, task.wrong.to(at.device)[..., None])[..., 0]
        return (good - bad).mean(-1)
    if task.metric == "prob_diff":
        probs = at.softmax(-1)
        good = probs.gather(-1, correct)[..., 0]
        if task.wrong is None:
            return good.mean(-1)
        bad = probs.gather(-1, task.wrong.to(at.device)[..., None])[..., 0]
        return (good - bad).mean(-1)
    if clean_logits is None:
        raise CircuitsError(f"task {task.name}: the kl metric needs the clean run's logits")
    ref = answer_logits(clean_logits, task).log_softmax(-1)
    kl = (ref.exp() * (ref - at.log_softmax(-1))).sum(-1)
    return -kl.mean(-1)


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
        raise CircuitsError(f"unknown task {name!r}; expected one of: {', '.join(sorted(TASKS))}")
    kwargs = {"seed": seed} if n_examples is None else {"n_examples": n_examples, "seed": seed}
    task = TASKS[name](model, **kwargs)
    d_vocab_out = model.cfg.d_vocab_out if getattr(model.cfg, "d_vocab_out", -1) and model.cfg.d_vocab_out > 0 else None
    task.check_fits(model.cfg.d_vocab, model.cfg.n_ctx, d_vocab_out)
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
