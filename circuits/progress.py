"""Progress measures per checkpoint: in-context learning, and grokking's hidden progress.

``progress_analysis(ctx)`` is the per-step visit analysis (stored under ``/progress/{key}``).
A step's visit reads only its own checkpoint (``ctx.model``), so what it stores does not
depend on when the sweep ran or on which later checkpoints existed then. What it measures
depends on the run:

Every run except modular addition: the **in-context-learning score** (Olsson et al. 2022:
loss late in the context minus loss early in it) on probe prompts of repeated random tokens
(``BOS x_1..x_n x_1..x_n``, the same probes as the head detectors):

- ``early_loss``: mean next-token loss predicting ``x_2..x_n`` (first half: unpredictable),
- ``late_loss``: mean loss predicting the repeated ``x_2..x_n`` (second half),
- ``icl_score = late_loss - early_loss`` (negative once the model copies from its context),
- ``loss_by_position``: ``[2n]`` loss of each prediction.

Modular addition (``manifest.local.recipe == "modular-addition"``; Nanda et al. 2023), on
every pair ``a b =`` and the run's own train/test split. Three places compute its measures:

*Per step* (the visit, from this checkpoint alone):

- ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``;
- ``embed_freq_norm``: ``[(p-1)/2]`` norm of the embedding ``W_E[:p]`` in the Fourier basis
  of Z_p per frequency ``k`` (cos and sin components together);
- ``top_share``: share of the embedding's squared Fourier norm (constant term excluded) in
  this step's own top ``n_key`` (option ``n_key_freqs``, 5) frequencies.

*At run end* (``circuits.run_end``: the sweep once the run's final step is visited, or
``circuits finalize STUDY``), written to the study's ``run_end.h5`` and read as
``progress/...`` by the study: with the key frequencies of the run's *final* checkpoint (its
top ``n_key`` ``embed_freq_norm``, one set for the whole run, as in the paper):

- ``key_freqs``: ``[n_key]`` those frequencies;
- ``restricted_loss``: loss on all pairs when the logits keep only their key-frequency
  components: for each output ``c``, the logits as a function of ``(a, b)`` are projected onto
  ``cos(w_k (a+b))`` and ``sin(w_k (a+b))`` for the key ``k`` plus the constant;
- ``excluded_loss``: training loss when exactly those key-frequency components are removed.

*From the study* (``circuits.tracking.track``, pure, no checkpoint): ``key_share``, the share
of each step's stored ``embed_freq_norm`` (squared, constant excluded) in the key frequencies.

With option ``key_freqs`` (an explicit list) nothing depends on another checkpoint, so the
visit stores ``key_freqs``, ``key_share``, ``restricted_loss`` and ``excluded_loss`` itself
and there is nothing to do at run end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def n_key_freqs(options: dict, p: int) -> int:
    """How many key frequencies (option ``n_key_freqs``, 5), at most the (p-1)/2 there are."""
    return min(int(options.get("n_key_freqs", N_KEY_FREQS)), (p - 1) // 2)


@dataclass(frozen=True)
class ModAddOutputs:
    """One checkpoint's outputs on every pair ``a b =``, with the run's train/test split."""

    p: int
    full: Float[Tensor, "pairs pos vocab"]  # the model's logits at every position
    pairs: Tensor  # [p*p, 3] inputs, a major
    train_idx: Tensor
    test_idx: Tensor

    @property
    def logits(self) -> Float[Tensor, "pairs p"]:
        """Logits over the answers ``0..p-1`` at the ``=`` position, float64."""
        return self.full[:, -1, : self.p].double()

    @property
    def answers(self) -> Tensor:
        return (self.pairs[:, 0] + self.pairs[:, 1]) % self.p


def modular_addition_outputs(model, manifest, device: str = "cpu") -> ModAddOutputs:
    """A forward pass of ``model`` over every pair of the run ``manifest`` describes."""
    from circuits.recipes.modular_addition import all_pairs, train_test_split

    local = manifest.local
    if local is None:
        raise CircuitsError(f"manifest {manifest.name}: the modular-addition measures need a local run")
    p = int(local.options["p"])
    train_idx, test_idx = train_test_split(p, float(local.options["train_frac"]), int(local.seed or 0))
    pairs = all_pairs(p)
    with torch.no_grad():
        full = model(pairs.to(device)).cpu()
    return ModAddOutputs(p, full, pairs, train_idx, test_idx)


def model_freq_norms(model, p: int) -> np.ndarray:
    """``embed_freq_norms`` of a model's embedding rows ``0..p-1`` (the numbers)."""
    return embed_freq_norms(model.W_E.detach().float().cpu()[:p])


def modular_addition_measures(ctx: VisitContext) -> AnalysisResult:
    """The per-step grokking measures; with option ``key_freqs`` also those that use the keys."""
    from circuits.recipes.modular_addition import answer_loss_and_accuracy

    out = modular_addition_outputs(ctx.model, ctx.manifest, ctx.device)
    p, pairs, train_idx, test_idx = out.p, out.pairs, out.train_idx, out.test_idx
    # Loss and accuracy exactly as the recipe evaluates them (metrics.json).
    train_loss, train_acc = answer_loss_and_accuracy(out.full[train_idx], pairs[train_idx], p)
    test_loss, test_acc = answer_loss_and_accuracy(out.full[test_idx], pairs[test_idx], p)
    norms = model_freq_norms(ctx.model, p)
    n_key = len(ctx.options["key_freqs"]) if "key_freqs" in ctx.options else n_key_freqs(ctx.options, p)
    measures: AnalysisResult = {
        "train_loss": train_loss.item(),
        "test_loss": test_loss.item(),
        "train_acc": train_acc.item(),
        "test_acc": test_acc.item(),
        "embed_freq_norm": norms.astype("float32"),
        "top_share": key_share(norms, top_freqs(norms, n_key)),
    }
    if "key_freqs" in ctx.options:  # given keys: nothing here depends on another checkpoint
        keys = np.asarray(ctx.options["key_freqs"], dtype=np.int64)
        restricted, excluded = restricted_and_excluded(out.logits, out.answers, train_idx, p, keys)
        measures |= {"key_freqs": keys, "key_share": key_share(norms, keys),
                     "restricted_loss": restricted, "excluded_loss": excluded}
    return measures


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
