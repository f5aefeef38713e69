"""The local learning coefficient (LLC) of each checkpoint: devinterp's SGLD sampler, in the visit.

The LLC (Watanabe's learning coefficient, localised at the trained weights w*: Lau et al. 2023)
measures how degenerate the loss landscape is around w*: lower means more directions along
which the loss stays flat, a "simpler" solution. It is estimated by sampling weights from a
tempered posterior localised at w* with SGLD and comparing their loss with the loss at w*:

    llc = n_beta * (E_w[L_n(w)] - L_n(w*))

with ``n_beta`` the inverse temperature (default ``batch / log(batch)``, devinterp's
``default_nbeta``), the expectation over SGLD draws after burn-in, and ``L_n`` the mean loss on
a batch. The SGLD step is ``dw = lr/2 * (-n_beta * grad L + gamma * (w* - w)) + N(0, lr)``
(``gamma``: the localisation). Each chain gives one estimate; ``llc_mean`` is their mean,
``llc_std`` their spread, ``llc_se = llc_std / sqrt(chains)`` the standard error of the mean.

What is sampled. devinterp copies the model once per chain and updates the copy. A
TransformerBridge cannot be deep-copied, and ``torch.func.functional_call`` does not put its
weights back; so the sampler gets a fresh module loaded from the checkpoint's own files (the
native module of a built-in run, or the Hugging Face model), wrapped to return logits. Its
logits are checked against the bridge's before sampling (:func:`sampling_module`), and the
study's model is never touched (tests check that its weights are bit for bit unchanged).

The loss. For the built-in induction recipe, the run's own training loss: next-token
cross-entropy on fresh sequences from its training distribution (``data="training"``, as
Hoogland et al. 2024 estimate the LLC on the training loss). Otherwise the task's own loss
on its clean prompts (``data="task"``: minus the log-probability of the correct answers,
``tasks.loss_at_answers``).

Stored under ``llc/`` in every shard (one row per step in the index): ``llc_mean``,
``llc_std``, ``llc_se``, ``llc_per_chain`` [chains], ``init_loss``, ``loss_trace`` [chains,
burnin + draws] (the mean batch loss at every SGLD step of each chain: flat after burn-in is
what a trustworthy estimate looks like), the trace diagnostics ``trace_rise`` and
``trace_drift`` [chains] and ``healthy`` (:func:`diagnose`), and every setting
(``lr``, ``localization``, ``nbeta``, ``chains``, ``draws``, ``burnin``, ``batch_size``,
``n_data``, ``seed``, ``data`` 0 = training, 1 = task).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from circuits.errors import CircuitsError

DATA_SOURCES = ("auto", "training", "task")
DATA_CODES = {"training": 0, "task": 1}  # how ``data`` is stored (numbers only in a shard)
# A chain is healthy when its loss, after burn-in, stays within these bounds (see ``diagnose``).
MAX_DRIFT = 0.1  # |mean of the last half - mean of the first half| / rise: the trace has levelled off
PARITY_TOL = 1e-4  # the sampled module's logits against the bridge's (float32)


@dataclass(frozen=True)
class LLCSettings:
    """SGLD and LLC settings; ``nbeta`` None means ``batch_size / log(batch_size)``.

    Defaults calibrated on the built-in induction run with ``circuits llc-calibrate``
    (docs/tracking.md, "Developmental stages"): traces flat after burn-in at every
    checkpoint, the lowest cost that keeps the standard error well below the curve's moves.
    """

    lr: float = 1e-3
    localization: float = 100.0
    nbeta: float | None = None
    chains: int = 4
    draws: int = 80
    burnin: int = 20
    batch_size: int = 32
    n_data: int = 1024
    seed: int = 0
    data: str = "auto"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """One line naming the setting when a value is out of range (``--llc KEY=VALUE``)."""
        if not _number(self.lr) or self.lr <= 0:
            raise CircuitsError(f"--llc lr={self.lr!r}: expected a step size above 0, e.g. 3e-4")
        if not _number(self.localization) or self.localization < 0:
            raise CircuitsError(f"--llc localization={self.localization!r}: expected a number >= 0, e.g. 100")
        if self.nbeta is not None and (not _number(self.nbeta) or self.nbeta <= 0):
            raise CircuitsError(f"--llc nbeta={self.nbeta!r}: expected a number above 0 (or leave it out: "
                                "batch_size / log(batch_size))")
        for name, least in (("chains", 2), ("draws", 2), ("burnin", 0), ("batch_size", 2), ("n_data", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                why = " (the standard error needs two chains)" if name == "chains" else ""
                raise CircuitsError(f"--llc {name}={value!r}: expected a whole number >= {least}{why}")
        if self.batch_size > self.n_data:
            raise CircuitsError(f"--llc batch_size={self.batch_size}: larger than n_data={self.n_data}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise CircuitsError(f"--llc seed={self.seed!r}: expected a whole number")
        if self.data not in DATA_SOURCES:
            raise CircuitsError(f"--llc data={self.data!r}: expected one of {', '.join(DATA_SOURCES)}")

    @property
    def inverse_temperature(self) -> float:
        return float(self.nbeta) if self.nbeta is not None else self.batch_size / math.log(self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_settings(text: str | Mapping[str, Any] | None, base: LLCSettings | None = None) -> LLCSettings:
    """``"lr=3e-4,localization=100,draws=200"`` (or a mapping) over ``base`` (default: the defaults)."""
    base = base or LLCSettings()
    if text is None or text == "":
        return base
    if isinstance(text, Mapping):
        pairs = dict(text)
    else:
        pairs = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            if not sep:
                raise CircuitsError(f"--llc {part!r}: expected KEY=VALUE pairs separated by commas, e.g. "
                                    "lr=3e-4,localization=100,draws=100")
            pairs[key.strip()] = value.strip()
    known = {f.name: f for f in fields(LLCSettings)}
    values: dict[str, Any] = {}
    for key, value in pairs.items():
        if key not in known:
            raise CircuitsError(f"--llc {key}: unknown setting; settings are {', '.join(known)}")
        values[key] = _coerce(key, value, getattr(base, key))
    return replace(base, **values)


def _coerce(key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    if key == "data":
        return value
    if key == "nbeta" and value.lower() in ("none", "default", ""):
        return None
    try:
        number = float(value)
    except ValueError:
        raise CircuitsError(f"--llc {key}={value!r}: expected a number") from None
    whole = key in ("chains", "draws", "burnin", "batch_size", "n_data", "seed")
    if whole:
        if number != int(number):
            raise CircuitsError(f"--llc {key}={value!r}: expected a whole number")
        return int(number)
    return number


# ---------------------------------------------------------------- what the sampler sees


class LogitsModule(nn.Module):
    """A plain module returning logits ``[batch, pos, vocab]``: what devinterp samples.

    It wraps a fresh copy of the checkpoint (never the study's model). No ``cfg`` attribute on
    purpose: devinterp treats a module with ``cfg.n_heads`` as a HookedTransformer and calls
    ``.to(device, print_details=False)``, which a plain module refuses.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.inner(tokens)
        return out if isinstance(out, Tensor) else out.logits


def sampling_module(model, manifest, step: int, device: str = "cpu") -> LogitsModule:
    """A fresh, unwrapped copy of the checkpoint at ``step``, its logits checked against ``model``'s."""
    from circuits.checkpoint import NATIVE_FORMAT, load_native_module, read_checkpoint_config
    from circuits.loading import checkpoint_dir

    if manifest.source == "local":
        path = checkpoint_dir(manifest, step)
        if read_checkpoint_config(path).get("format") == NATIVE_FORMAT:
            inner, _ = load_native_module(path, device)
        else:
            inner = _hf_model(str(path), None, device)
    else:
        inner = _hf_model(manifest.hub.repo, manifest.hub.revision(step), device)
    sampled = LogitsModule(inner).eval()
    _check_parity(model, sampled, device)
    return sampled


def _hf_model(name: str, revision: str | None, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"use_safetensors": True}  # never unpickle weights
    if revision is not None:
        kwargs["revision"] = revision
    model: nn.Module = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    return model.to(device)


def _check_parity(model, sampled: LogitsModule, device: str) -> None:
    """Refuse to sample a module that is not the study's model (same logits on a probe batch)."""
    n_ctx = min(int(model.cfg.n_ctx), 16)
    probe = torch.randint(0, int(model.cfg.d_vocab), (2, n_ctx), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ours, theirs = model(probe).float(), sampled(probe).float()
    gap = float((ours - theirs).abs().max())
    if not gap <= PARITY_TOL * max(1.0, float(ours.abs().max())):
        raise CircuitsError(f"llc: the checkpoint's module gives other logits than the study's model "
                            f"(max difference {gap:.3g}); the LLC is not estimated on a different model")


# ---------------------------------------------------------------- data and loss


@dataclass(frozen=True)
class LLCData:
    """What the sampler draws batches from: ``input_ids`` rows, and the loss it takes of them."""

    source: str  # "training" or "task"
    input_ids: Tensor  # [n, seq]; for "task": [n, 1 + seq] with the prompt's row index first
    loss_fn: Any  # devinterp's per-token loss (model, input_ids) -> [batch, seq - 1], or None (next-token)


def source_of(manifest, settings: LLCSettings) -> str:
    """``auto``: the training distribution for the built-in induction recipe, else the task."""
    if settings.data != "auto":
        if settings.data == "training" and _recipe(manifest) != "induction":
            raise CircuitsError(f"--llc data=training: {manifest.name} is not a built-in induction run "
                                "(its training data is not known here); use data=task")
        return settings.data
    return "training" if _recipe(manifest) == "induction" else "task"


def _recipe(manifest) -> str | None:
    local = getattr(manifest, "local", None)
    return getattr(local, "recipe", None) if manifest.source == "local" else None


def llc_data(manifest, task, settings: LLCSettings) -> LLCData:
    """The batches and the loss for ``settings`` (seeded by ``settings.seed``)."""
    source = source_of(manifest, settings)
    generator = torch.Generator().manual_seed(7_919 * (settings.seed + 1))  # apart from the training seeds
    if source == "training":
        from circuits.recipes.induction import DEFAULTS, varied_repeats

        options = {**DEFAULTS, **manifest.local.options}
        tokens = varied_repeats(settings.n_data, options["half_len"], options["min_half"], options["vocab"], generator)
        return LLCData("training", tokens, None)
    rows = torch.randint(0, task.n_examples, (settings.n_data,), generator=generator)
    # devinterp's loss sees input_ids only: the row index rides in front so the task's own loss
    # (answers, positions, padding of that row) can be taken per example.
    return LLCData("task", torch.cat([rows[:, None], task.clean[rows]], dim=1), _task_loss(task))


def _task_loss(task):
    from circuits.tasks import answer_logits, loss_at_answers

    def loss(model: nn.Module, input_ids: Tensor) -> Tensor:
        rows, tokens = input_ids[:, 0].cpu(), input_ids[:, 1:]
        sub = replace(task, clean=task.clean[rows], corrupted=task.corrupted[rows], answer_pos=task.answer_pos[rows],
                      correct=task.correct[rows], wrong=None if task.wrong is None else task.wrong[rows],
                      lengths=None if task.lengths is None else task.lengths[rows])
        per_example = loss_at_answers(answer_logits(model(tokens), sub).float(), sub)
        # devinterp wants [batch, seq - 1] and averages it: every slot holds the example's loss
        return per_example[:, None].expand(-1, input_ids.shape[1] - 1)

    return loss


# ---------------------------------------------------------------- the estimate


@dataclass
class LLCEstimate:
    """One checkpoint's estimate with its sampler diagnostics (arrays: ``to_arrays``)."""

    settings: LLCSettings
    source: str
    llc_per_chain: np.ndarray  # [chains]
    init_loss: float
    loss_trace: np.ndarray  # [chains, burnin + draws]
    trace_rise: np.ndarray  # [chains]
    trace_drift: np.ndarray  # [chains]
    healthy: bool
    devinterp_llc_mean: float  # devinterp's own compute_llc (it averages burn-in steps too)

    @property
    def llc_mean(self) -> float:
        return float(self.llc_per_chain.mean())

    @property
    def llc_std(self) -> float:
        return float(self.llc_per_chain.std(ddof=1))

    @property
    def llc_se(self) -> float:
        return self.llc_std / math.sqrt(len(self.llc_per_chain))

    def to_arrays(self) -> dict[str, np.ndarray | float | int]:
        s = self.settings
        return {
            "llc_mean": self.llc_mean, "llc_std": self.llc_std, "llc_se": self.llc_se,
            "llc_per_chain": self.llc_per_chain.astype(np.float64), "init_loss": self.init_loss,
            "loss_trace": self.loss_trace.astype(np.float32), "trace_rise": self.trace_rise,
            "trace_drift": self.trace_drift, "healthy": np.asarray(self.healthy),
            "lr": float(s.lr), "localization": float(s.localization), "nbeta": s.inverse_temperature,
            "chains": s.chains, "draws": s.draws, "burnin": s.burnin, "batch_size": s.batch_size,
            "n_data": s.n_data, "seed": s.seed, "data": DATA_CODES[self.source],
        }


def diagnose(trace: np.ndarray, init_loss: float, burnin: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(rise, drift, healthy) of loss traces ``[chains, steps]``.

    ``rise`` = mean loss after burn-in minus the loss at w* (the LLC is ``n_beta`` times it);
    ``drift`` = (mean of the last half of the draws - mean of the first half) / rise: a trace
    still climbing (lr too large, or localisation too weak: the chain wanders off) or still
    settling has |drift| large. Healthy: every trace finite, rise > 0 and |drift| <= MAX_DRIFT
    (devinterp's guidance: traces that level off after burn-in, no divergence, llc > 0).
    """
    draws = np.asarray(trace, dtype=float)[:, burnin:]
    rise = draws.mean(1) - init_loss
    half = draws.shape[1] // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = (draws[:, half:].mean(1) - draws[:, :half].mean(1)) / np.abs(rise)
    healthy = bool(np.isfinite(draws).all() and (rise > 0).all() and (np.abs(drift) <= MAX_DRIFT).all())
    return rise, np.nan_to_num(drift, nan=np.inf), healthy


def estimate(sampled: nn.Module, data: LLCData, settings: LLCSettings, device: str = "cpu") -> LLCEstimate:
    """devinterp's SGLD chains on ``sampled`` (``sample`` + ``compute_llc``); seeded by ``settings.seed``."""
    from datasets import Dataset  # type: ignore[import-untyped]
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample

    s = settings
    dataset = Dataset.from_dict({"input_ids": data.input_ids.tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory(prefix="circuits-llc-") as tmp, warnings.catch_warnings():
        # devinterp warns that its zarr output goes to a temporary folder: we keep what we need
        warnings.filterwarnings("ignore", message="Sampling without output_path")
        tree = _quiet_sample(sample, sampled, dataset, s, device, data.loss_fn, Path(tmp) / "samples.zarr")
        result = compute_llc(tree)
        trace = np.asarray(result["loss_trace"].values, dtype=float)  # [chains, burnin + draws]
        init_loss = float(result["init_loss"].values)
        devinterp_mean = float(result["llc_mean"].values)
    if trace.shape != (s.chains, s.burnin + s.draws) or not np.isfinite(trace).all():
        raise CircuitsError(f"llc: a chain diverged (loss not finite) with lr={s.lr:g}, localization={s.localization:g}; "
                            "lower lr or raise localization (circuits llc-calibrate)")
    per_chain = s.inverse_temperature * (trace[:, s.burnin:].mean(1) - init_loss)
    rise, drift, healthy = diagnose(trace, init_loss, s.burnin)
    return LLCEstimate(s, data.source, per_chain, init_loss, trace, rise, drift, healthy, devinterp_mean)


def _quiet_sample(sample, sampled, dataset, s: LLCSettings, device: str, loss_fn, path: Path):
    """``devinterp.slt.sampling.sample`` without its per-chain progress bars."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return sample(sampled, dataset, {}, lr=s.lr, n_beta=s.inverse_temperature, localization=s.localization,
                      num_chains=s.chains, num_draws=s.draws, num_burnin_steps=s.burnin, batch_size=s.batch_size,
                      num_init_loss_batches=max(1, min(32, s.n_data // s.batch_size)), init_seed=s.seed,
                      device=device, output_path=str(path), loss_fn=loss_fn,
                      # each chain its own batches: their spread then holds the data's noise too, so the
                      # standard error over chains covers another seed's batches (with devinterp's default,
                      # shared batches, it did not: tests/test_llc.py)
                      match_sampling_input_ids_across_chains=False)


def estimate_at(model, manifest, task, step: int, settings: LLCSettings, device: str = "cpu") -> LLCEstimate:
    """The LLC of the checkpoint at ``step`` (``model`` is its bridge, left untouched)."""
    sampled = sampling_module(model, manifest, step, device)
    return estimate(sampled, llc_data(manifest, task, settings), settings, device)


def llc_analysis(ctx) -> dict[str, np.ndarray | float | int]:
    """The visit's ``llc`` analysis: settings from ``ctx.options["llc"]`` (a mapping; defaults otherwise)."""
    settings = parse_settings(ctx.options.get("llc"))
    import random

    # devinterp seeds torch, numpy and random globally: the analyses after this one keep their state
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        return estimate_at(ctx.model, ctx.manifest, ctx.task, ctx.step, settings, ctx.device).to_arrays()
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
