"""Progress measures per checkpoint: in-context learning, and grokking's hidden progress.

``progress_analysis(ctx)`` is the per-step visit analysis (stored under ``/progress/{key}``).
What it measures depends on the run:

Every run except modular addition: the **in-context-learning score** (Olsson et al. 2022:
loss late in the context minus loss early in it) on probe prompts of repeated random tokens
(``BOS x_1..x_n x_1..x_n``, the same probes as the head detectors):

- ``early_loss``: mean next-token loss predicting ``x_2..x_n`` (first half: unpredictable),
- ``late_loss``: mean loss predicting the repeated ``x_2..x_n`` (second half),
- ``icl_score = late_loss - early_loss`` (negative once the model copies from its context),
- ``loss_by_position``: ``[2n]`` loss of each prediction.

Modular addition (``manifest.local.recipe == "modular-addition"``; Nanda et al. 2023), on
every pair ``a b =`` and the run's own train/test split:

- ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``;
- ``embed_freq_norm``: ``[(p-1)/2]`` norm of the embedding ``W_E[:p]`` in the Fourier basis
  of Z_p per frequency ``k`` (cos and sin components together);
- ``key_freqs``: ``[n_key]`` the key frequencies: the ``n_key`` (option ``n_key_freqs``, 5)
  largest ``embed_freq_norm`` of the run's *final* checkpoint (as in the paper, one set for
  the whole run; the last one written for a run still training; option ``key_freqs`` overrides);
- ``key_share``: share of the embedding's squared Fourier norm (constant term excluded) in
  the key frequencies; ``top_share``: the same for this step's own top ``n_key``;
- ``restricted_loss``: loss on all pairs when the logits keep only their key-frequency
  components: for each output ``c``, the logits as a function of ``(a, b)`` are projected onto
  ``cos(w_k (a+b))`` and ``sin(w_k (a+b))`` for the key ``k`` plus the constant;
- ``excluded_loss``: training loss when exactly those key-frequency components are removed.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuits.errors import CircuitsError
from circuits.visit import AnalysisResult, VisitContext

N_KEY_FREQS = 5


# ---------------------------------------------------------------- in-context learning


def icl_measures(model, tokens: Tensor, device: str = "cpu") -> dict[str, np.ndarray | float]:
    """ICL score on repeated-token prompts ``[batch, 1 + 2n]`` (BOS, a half, the half again)."""
    half = (tokens.shape[1] - 1) // 2
    with torch.no_grad():
        logits = model(tokens.to(device)).float().cpu()
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)  # [2n]
    # loss[i] predicts token i+1: first half x_2..x_n is i = 1..n-1; repeated x_2..x_n is i = n+1..2n-1.
    early = loss[1:half].mean() if half > 1 else loss[:half].mean()
    late = loss[half + 1 :].mean() if half > 1 else loss[half:].mean()
    return {
        "early_loss": float(early),
        "late_loss": float(late),
        "icl_score": float(late - early),
        "loss_by_position": loss.numpy().astype("float32"),
    }


# ---------------------------------------------------------------- Fourier measures


def fourier_basis(p: int) -> Float[Tensor, "p p"]:
    """Orthonormal rows over Z_p: constant, then cos k, sin k for k = 1..(p-1)/2."""
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True)


def embed_freq_norms(W_E: Float[Tensor, "p d_model"]) -> np.ndarray:
    """``[(p-1)/2]``: norm of the embedding's cos k and sin k components, per frequency k."""
    p = W_E.shape[0]
    coeffs = fourier_basis(p) @ W_E.double()  # [p, d_model]
    sq = coeffs.pow(2).sum(-1)
    return (sq[1::2] + sq[2::2]).sqrt().numpy()


def key_share(freq_norms: np.ndarray, freqs: np.ndarray) -> float:
    """Share of squared Fourier norm (constant excluded) in ``freqs`` (1-based frequencies)."""
    sq = np.asarray(freq_norms, dtype=float) ** 2
    return float(sq[np.asarray(freqs) - 1].sum() / max(sq.sum(), 1e-30))


def top_freqs(freq_norms: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` frequencies (1-based) with the largest norms, in increasing order."""
    return np.sort(np.argsort(-np.asarray(freq_norms))[:n] + 1)


def sum_directions(p: int, freqs: np.ndarray) -> Float[Tensor, "dirs pairs"]:
    """Orthonormal ``cos(w_k (a+b))``, ``sin(w_k (a+b))`` over all pairs (a major), per key k."""
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    rows = []
    for k in np.asarray(freqs).tolist():
        w = 2 * math.pi * k / p
        rows += [torch.cos(w * (a + b)), torch.sin(w * (a + b))]
    dirs = torch.stack(rows)
    return dirs / dirs.norm(dim=1, keepdim=True)


def restricted_and_excluded(
    logits: Float[Tensor, "pairs p"], answers: Tensor, train_idx: Tensor, p: int, freqs: np.ndarray
) -> tuple[float, float]:
    """(restricted loss on all pairs, excluded loss on the training pairs); logits over all p*p pairs."""
    logits = logits.double()
    dirs = sum_directions(p, freqs)  # [2K, p*p]
    key_part = dirs.T @ (dirs @ logits)  # [p*p, p]
    const = logits.mean(0, keepdim=True)
    restricted = F.cross_entropy(key_part + const, answers).item()
    excluded = F.cross_entropy((logits - key_part)[train_idx], answers[train_idx]).item()
    return restricted, excluded


@lru_cache(maxsize=8)
def _final_key_freqs(origin: str, final_step: int, n_key: int) -> tuple[int, ...]:
    from circuits.loading import load
    from circuits.manifest import load_manifest

    model = load(load_manifest(origin), final_step)
    p = int(model.cfg.d_vocab_out)
    norms = embed_freq_norms(model.W_E.detach().float().cpu()[:p])
    return tuple(int(k) for k in top_freqs(norms, n_key))


def _last_available_step(manifest) -> int:
    """The run's last step; for a local run still training, the last checkpoint written so far."""
    if manifest.source == "local" and manifest.origin is not None:
        from circuits.checkpoint import step_dirname

        root = manifest.checkpoint_root  # a property that resolves paths: once, not per step
        for step in reversed(manifest.steps):
            if (root / step_dirname(step) / "config.json").exists():
                return step
    return manifest.steps[-1]


def key_frequencies(ctx: VisitContext, p: int, norms: np.ndarray | None = None) -> np.ndarray:
    """The run's key frequencies: ``ctx.options['key_freqs']``, else the final checkpoint's top ones.

    ``norms``: this step's ``embed_freq_norms``, when the caller has them already."""
    if "key_freqs" in ctx.options:
        return np.asarray(ctx.options["key_freqs"], dtype=np.int64)
    n_key = min(int(ctx.options.get("n_key_freqs", N_KEY_FREQS)), (p - 1) // 2)
    final = _last_available_step(ctx.manifest)
    if ctx.step == final or ctx.manifest.origin is None:
        if norms is None:
            norms = embed_freq_norms(ctx.model.W_E.detach().float().cpu()[:p])
        return top_freqs(norms, n_key)
    return np.asarray(_final_key_freqs(ctx.manifest.origin, final, n_key), dtype=np.int64)


def modular_addition_measures(ctx: VisitContext) -> AnalysisResult:
    from circuits.recipes.modular_addition import (
        all_pairs,
        answer_loss_and_accuracy,
        train_test_split,
    )

    local = ctx.manifest.local
    if local is None:
        raise CircuitsError(f"manifest {ctx.manifest.name}: the modular-addition measures need a local run")
    p = int(local.options["p"])
    train_idx, test_idx = train_test_split(p, float(local.options["train_frac"]), int(local.seed or 0))
    pairs = all_pairs(p)
    with torch.no_grad():
        full = ctx.model(pairs.to(ctx.device)).cpu()
    # Loss and accuracy exactly as the recipe evaluates them (metrics.json).
    train_loss, train_acc = answer_loss_and_accuracy(full[train_idx], pairs[train_idx], p)
    test_loss, test_acc = answer_loss_and_accuracy(full[test_idx], pairs[test_idx], p)
    logits = full[:, -1, :p].double()
    answers = (pairs[:, 0] + pairs[:, 1]) % p
    norms = embed_freq_norms(ctx.model.W_E.detach().float().cpu()[:p])
    keys = key_frequencies(ctx, p, norms)
    restricted, excluded = restricted_and_excluded(logits, answers, train_idx, p, keys)
    return {
        "train_loss": train_loss.item(),
        "test_loss": test_loss.item(),
        "train_acc": train_acc.item(),
        "test_acc": test_acc.item(),
        "embed_freq_norm": norms.astype("float32"),
        "key_freqs": keys.astype(np.int64),
        "key_share": key_share(norms, keys),
        "top_share": key_share(norms, top_freqs(norms, len(keys))),
        "restricted_loss": restricted,
        "excluded_loss": excluded,
    }


# ---------------------------------------------------------------- the visit analysis


def is_modular_addition(ctx: VisitContext) -> bool:
    local = ctx.manifest.local
    return local is not None and local.recipe == "modular-addition"


def progress_analysis(ctx: VisitContext) -> AnalysisResult:
    """Visit analysis ``progress``: ICL measures, or grokking measures on modular-addition runs.

    Options (``ctx.options``): ``progress_n_examples`` (64), ``progress_half_len`` (16);
    modular addition: ``n_key_freqs`` (5), ``key_freqs`` (explicit list).
    """
    if is_modular_addition(ctx):
        return modular_addition_measures(ctx)
    from circuits.detectors import probe_tokens

    tokens = probe_tokens(
        ctx.model,
        n_examples=int(ctx.options.get("progress_n_examples", 64)),
        half_len=int(ctx.options.get("progress_half_len", 16)),
    )
    return icl_measures(ctx.model, tokens, ctx.device)
