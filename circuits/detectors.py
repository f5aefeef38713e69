"""Head detectors: one score per attention head per checkpoint, for five kinds of head.

``head_analysis(ctx)`` is the per-step visit analysis (stored under ``/heads/{kind}``, each
``[n_layers, n_heads]``); the pure functions below take plain tensors and are what the tests
check against TransformerLens' ``head_detector`` (the oracle).

Attention-pattern scores, on probe prompts of repeated random tokens
(``BOS x_1..x_n x_1..x_n``, tokens drawn uniformly from the model's vocabulary without BOS):

- ``previous_token``: attention from position q to q-1,
- ``duplicate_token``: attention from q to earlier positions holding the same token,
- ``induction`` (prefix matching, Olsson et al. 2022): attention from q to the position just
  after an earlier occurrence of the token at q.

Each is TransformerLens' ``"mul"`` score (the share of the head's attention that falls on the
detection pattern) with one change: it averages over the query positions that *have* a
target (for induction and duplicate-token: the repeated half), not over every position, so
a perfect head scores 1.0 instead of ~0.5. ``pattern_scores(..., rows="all")`` gives TL's
normalisation exactly.

Weight-based (OV circuit) scores, which need no prompt and no tokenizer. For head (l, h) the
full OV circuit is ``M = norm(W_E[src]) W_V W_O norm(.) W_U`` ([n_src, d_vocab]): the direct
effect on the logits of the head attending to token ``t``. ``norm`` is the model's LayerNorm
without its learned scale and shift (a per-row positive scale for RMSNorm/LN: it never changes
a row's ranking), skipped for models without normalisation. Rows are centred.

- ``successor`` (Gould et al. 2023): share of source tokens ``t`` whose successor ``t+1`` is
  among the ``k`` highest logits of ``M[t]``. Without a tokenizer the successor of token id
  ``t`` is ``t+1``; with one, it is the next element of an ordinal sequence (numbers 1..99,
  weekdays, months, letters) where both are single tokens.
- ``copy_suppression`` (McDougall et al. 2023): share of source tokens ``t`` for which ``t``
  itself is among the ``k`` lowest logits of ``M[t]`` (the head pushes down what it attends to).
- ``copying``: share of source tokens ``t`` that are among the ``k`` highest logits of ``M[t]``.

``k = max(1, round(d_vocab / 1000))`` (1 for small vocabularies, 50 for Pythia's 50k), and at
most 512 source tokens (a seeded sample) are used per head.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.visit import AnalysisResult, VisitContext

PATTERN_KINDS = ("previous_token", "duplicate_token", "induction")
OV_KINDS = ("successor", "copy_suppression", "copying")
KINDS = PATTERN_KINDS + OV_KINDS

PROBE_SEED = 7_919
MAX_SOURCE_TOKENS = 512


# ---------------------------------------------------------------- detection patterns


def detection_patterns(tokens: Int[Tensor, "batch pos"]) -> dict[str, Float[Tensor, "batch q k"]]:
    """The 0/1 target pattern of every attention-pattern kind, built as TL builds them."""
    batch, pos = tokens.shape
    causal = torch.ones(pos, pos, dtype=torch.bool).tril()
    previous = torch.zeros(pos, pos, dtype=torch.bool)
    previous[1:, :-1] = torch.eye(pos - 1, dtype=torch.bool)
    same = tokens[:, :, None] == tokens[:, None, :]
    duplicate = same & causal & ~torch.eye(pos, dtype=torch.bool)
    induction = torch.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]
    induction &= causal
    return {
        "previous_token": previous.expand(batch, pos, pos).float(),
        "duplicate_token": duplicate.float(),
        "induction": induction.float(),
    }


def pattern_scores(
    patterns: Float[Tensor, "batch head q k"],
    detection: Float[Tensor, "batch q k"],
    rows: str = "targets",
) -> Float[Tensor, " head"]:
    """Share of attention on the detection pattern, averaged over sequences.

    ``rows="targets"``: over query positions whose detection row is non-empty (ours);
    ``rows="all"``: over all query positions, which is TL's ``detect_head`` "mul" score.
    """
    hit = (patterns * detection[:, None]).sum(-1)  # [batch head q]
    if rows == "all":
        keep = torch.ones_like(detection[:, :, 0], dtype=torch.bool)
    elif rows == "targets":
        keep = detection.sum(-1) > 0  # [batch q]
    else:
        raise ValueError(f"rows={rows!r}: expected 'targets' or 'all'")
    mass = patterns.sum(-1)  # [batch head q], 1 for softmax patterns
    keep_f = keep[:, None].to(patterns.dtype)
    per_seq = (hit * keep_f).sum(-1) / (mass * keep_f).sum(-1).clamp_min(1e-12)  # [batch head]
    return per_seq.mean(0)


# ---------------------------------------------------------------- probe prompts


def _tokenizer(model):
    return getattr(model, "tokenizer", None)


def _vocab_size(model) -> int:
    cfg = model.cfg
    size = cfg.d_vocab
    if getattr(cfg, "d_vocab_out", -1) and cfg.d_vocab_out > 0:
        size = min(size, cfg.d_vocab_out)
    tok = _tokenizer(model)
    if tok is not None:
        size = min(size, len(tok))
    return int(size)


def _bos_id(model) -> int:
    tok = _tokenizer(model)
    if tok is not None and tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    return 0  # the built-in runs' BOS


def probe_tokens(model, n_examples: int = 32, half_len: int = 16, seed: int = PROBE_SEED) -> Int[Tensor, "batch pos"]:
    """``[n, 1 + 2*half_len]``: BOS then a random half repeated once (ids from the vocabulary, no BOS)."""
    half_len = max(1, min(half_len, (model.cfg.n_ctx - 1) // 2))
    vocab, bos = _vocab_size(model), _bos_id(model)
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(0, vocab - 1, (n_examples, half_len), generator=gen)
    half = half + (half >= bos).long()  # skip the BOS id
    first = torch.full((n_examples, 1), bos, dtype=torch.long)
    return torch.cat([first, half, half], dim=1)


def attention_patterns(model, tokens: Int[Tensor, "batch pos"], device: str = "cpu") -> Float[Tensor, "layer batch head q k"]:
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), names_filter=lambda n: n in names)
    return torch.stack([cache[name].float().cpu() for name in names])


# ---------------------------------------------------------------- OV-circuit scores


def _normalise(x: Tensor) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * x.shape[-1] ** 0.5


def _has_norm(model) -> bool:
    return getattr(model.cfg, "normalization_type", None) is not None


def successor_pairs(model) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """(source, successor) token ids: id ``t -> t+1`` without a tokenizer, ordinal words with one."""
    tok = _tokenizer(model)
    vocab = _vocab_size(model)
    if tok is None:
        src = torch.arange(0, vocab - 1)
        gen = torch.Generator().manual_seed(PROBE_SEED)
        if len(src) > MAX_SOURCE_TOKENS:
            src = src[torch.randperm(len(src), generator=gen)[:MAX_SOURCE_TOKENS]].sort().values
        return src, src + 1
    sequences = [
        [str(i) for i in range(1, 100)],
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
        ["January", "February", "March", "April", "May", "June", "July", "August", "September",
         "October", "November", "December"],
        list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        list("abcdefghijklmnopqrstuvwxyz"),
    ]
    sources: list[int] = []
    successors: list[int] = []
    for words in sequences:
        for prefix in (" ", ""):
            ids = [tok.encode(prefix + w, add_special_tokens=False) for w in words]
            for a, b in zip(ids, ids[1:], strict=False):
                if len(a) == 1 and len(b) == 1 and a[0] < vocab and b[0] < vocab:
                    sources.append(a[0])
                    successors.append(b[0])
    if not sources:  # a tokenizer with none of these as single tokens: fall back to ids
        src_t = torch.arange(0, min(vocab - 1, MAX_SOURCE_TOKENS))
        return src_t, src_t + 1
    return torch.tensor(sources), torch.tensor(successors)


def ov_scores(
    model,
    source: Int[Tensor, " n"],
    successor: Int[Tensor, " n"],
    k: int | None = None,
) -> dict[str, Float[Tensor, "layer head"]]:
    """Successor, copy-suppression and copying scores of every head from the weights."""
    cfg = model.cfg
    vocab = _vocab_size(model)
    k = k or max(1, round(vocab / 1000))
    with torch.no_grad():
        W_E = model.W_E.detach().float().cpu()[source]  # [n, d_model]
        W_V = model.W_V.detach().float().cpu()  # [layer, head, d_model, d_head]
        W_O = model.W_O.detach().float().cpu()  # [layer, head, d_head, d_model]
        W_U = model.W_U.detach().float().cpu()[:, :vocab]  # [d_model, vocab]
    norm = _has_norm(model)
    resid = _normalise(W_E) if norm else W_E
    out = {kind: torch.zeros(cfg.n_layers, cfg.n_heads) for kind in OV_KINDS}
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            written = resid @ W_V[layer, head] @ W_O[layer, head]  # [n, d_model]
            if norm:
                written = _normalise(written)
            logits = written @ W_U
            logits = logits - logits.mean(-1, keepdim=True)
            top = logits.topk(k, dim=-1).indices
            bottom = (-logits).topk(k, dim=-1).indices
            own = source[:, None]
            out["successor"][layer, head] = (top == successor[:, None]).any(-1).float().mean()
            out["copying"][layer, head] = (top == own).any(-1).float().mean()
            out["copy_suppression"][layer, head] = (bottom == own).any(-1).float().mean()
    return out


# ---------------------------------------------------------------- the visit analysis


def head_scores(model, n_examples: int = 32, half_len: int = 16, device: str = "cpu") -> dict[str, Float[Tensor, "layer head"]]:
    """Every detector's ``[n_layers, n_heads]`` scores for one model."""
    tokens = probe_tokens(model, n_examples, half_len)
    patterns = attention_patterns(model, tokens, device)  # [layer batch head q k]
    targets = detection_patterns(tokens)
    scores = {kind: torch.stack([pattern_scores(p, targets[kind]) for p in patterns]) for kind in PATTERN_KINDS}
    source, succ = successor_pairs(model)
    scores.update(ov_scores(model, source, succ))
    return scores


def head_analysis(ctx: VisitContext) -> AnalysisResult:
    """Visit analysis ``heads``: ``{kind: float32 [n_layers, n_heads]}`` for every kind in KINDS.

    Options (``ctx.options``): ``heads_n_examples`` (32), ``heads_half_len`` (16, capped by the
    context length).
    """
    scores = head_scores(
        ctx.model,
        n_examples=int(ctx.options.get("heads_n_examples", 32)),
        half_len=int(ctx.options.get("heads_half_len", 16)),
        device=ctx.device,
    )
    return {kind: value.numpy().astype("float32") for kind, value in scores.items()}
