"""Modular addition (grokking), after Nanda et al. 2023 "Progress measures for grokking".

Inputs ``a b =`` (tokens 0..p-1 and ``=`` = p), answer ``(a + b) mod p`` read at ``=``.
One layer, d_model 128, 4 heads, d_mlp 512, ReLU, no LayerNorm; full-batch AdamW,
lr 1e-3, weight decay 1.0, betas (0.9, 0.98), 30% of all pairs for training. Train accuracy
hits 100% early; test accuracy jumps much later (grokking). ``--p 31 --train-frac 0.7``
with ``--train-biases`` is the small variant the tests use (~40 s). By default every bias
stays at zero, untrained, as in the paper's code (``freeze_biases``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from circuits.errors import CircuitsError
from circuits.recipes.common import RunSpec, run_training
from circuits.steps import log_then_linear

DEFAULTS = {
    "steps": 20000,
    "seed": 0,
    "checkpoint_every": 500,
    "p": 113,
    "train_frac": 0.3,
    "lr": 1e-3,
    "weight_decay": 1.0,
    "d_model": 128,
    "n_heads": 4,
    "d_mlp": 512,
    # Nanda et al. train no biases (zero, frozen). The small test variant trains them.
    "freeze_biases": True,
}


def tl_config(options: dict) -> dict:
    p = options["p"]
    return {
        "d_model": options["d_model"], "n_layers": 1, "n_heads": options["n_heads"],
        "d_head": options["d_model"] // options["n_heads"], "d_mlp": options["d_mlp"],
        "n_ctx": 3, "d_vocab": p + 1, "d_vocab_out": p, "attn_only": False,
        "normalization_type": None, "act_fn": "relu", "positional_embedding_type": "standard",
        "seed": options["seed"],
    }


def all_pairs(p: int) -> torch.Tensor:
    """[p*p, 3]: every ``a b =`` input, in a fixed order (a major)."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    return torch.stack([a, b, torch.full_like(a, p)], dim=1)


def train_test_split(p: int, train_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into ``all_pairs(p)``: a seeded random ``train_frac`` share for training."""
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_frac * p * p))
    return order[:n_train].sort().values, order[n_train:].sort().values


def answer_loss_and_accuracy(logits: torch.Tensor, tokens: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    answers = (tokens[:, 0] + tokens[:, 1]) % p
    final = logits[:, -1, :p].to(torch.float64)
    return F.cross_entropy(final, answers), (final.argmax(-1) == answers).float().mean()


def train(out: Path, progress: bool = True, device: str = "cpu", **overrides) -> object:
    options = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    p = options["p"]
    # Checked before anything touches disk: both sets must hold at least one pair.
    if p < 2:
        raise CircuitsError(f"--p {p}: the modulus must be at least 2")
    if not 0 < round(options["train_frac"] * p * p) < p * p:
        raise CircuitsError(
            f"--train-frac {options['train_frac']}: expected a share strictly between 0 and 1 "
            f"that leaves pairs for both training and test (p={p} has {p * p} pairs)"
        )
    spec = RunSpec(
        name=f"modadd-p{p}",
        recipe="modular-addition",
        seed=options["seed"],
        options={k: v for k, v in options.items() if k != "seed"},
        tl_config=tl_config(options),
        schedule=log_then_linear(options["steps"], options["checkpoint_every"]),
        tokens_per_step=int(round(options["train_frac"] * p * p)) * 3,
        description=f"1-layer transformer on (a + b) mod {p}, Nanda et al. 2023 grokking setup",
    )
    pairs = all_pairs(p).to(device)
    train_idx, test_idx = train_test_split(p, options["train_frac"], options["seed"])
    train_tokens, test_tokens = pairs[train_idx], pairs[test_idx]

    def loss_fn(model, step):
        loss, _ = answer_loss_and_accuracy(model(train_tokens), train_tokens, p)
        return loss

    def evaluate(model):
        train_loss, train_acc = answer_loss_and_accuracy(model(train_tokens), train_tokens, p)
        test_loss, test_acc = answer_loss_and_accuracy(model(test_tokens), test_tokens, p)
        return {"train_loss": train_loss.item(), "test_loss": test_loss.item(),
                "train_acc": train_acc.item(), "test_acc": test_acc.item()}

    def optimizer_fn(model):
        if options["freeze_biases"]:  # biases start at zero; untrained, they stay there
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.requires_grad_(False)
        trained = [param for param in model.parameters() if param.requires_grad]
        return torch.optim.AdamW(trained, lr=options["lr"],
                                 weight_decay=options["weight_decay"], betas=(0.9, 0.98))

    return run_training(out, spec, loss_fn, evaluate, optimizer_fn, device=device, progress=progress)
