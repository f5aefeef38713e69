"""Loading one checkpoint of a run as a TransformerBridge: the seam with TransformerLens.

Hub runs (Pythia) go through ``TransformerBridge.boot_transformers(repo, revision=...)``,
which uses the local Hugging Face cache first (and only, with ``HF_HUB_OFFLINE=1``).
Local runs hold one checkpoint per step, where ``local.layout`` says (``step{N}/`` by default,
``checkpoint-{N}/``, ``NAME_{N}.safetensors``, a pattern: ``circuits.layouts``). A checkpoint is
either a built-in native run (``config.json`` with format ``circuits-native/1`` +
``model.safetensors``) or a Hugging Face ``save_pretrained`` folder, which boots through the
very same path as a Hub model; PyTorch state dicts and nanoGPT's ``ckpt.pt`` are converted to
such a folder first, once (``circuits.convert``).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from circuits.checkpoint import (
    NATIVE_FORMAT,
    bridge_native_module,
    load_native_module,
    read_checkpoint_config,
)
from circuits.convert import bootable_folder
from circuits.errors import CircuitsError, RetryableError, first_line
from circuits.layouts import WEIGHT_SUFFIXES, find_checkpoint
from circuits.manifest import Manifest, load_manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model")


def checkpoint_path(manifest: Manifest, step: int) -> Path:
    """Where step ``step`` of a local run lies, as its layout says: a folder or a weights file."""
    manifest.require_step(step)
    if manifest.local is None:
        raise CircuitsError(f"manifest {manifest.name}: a hub run has no local checkpoint folder")
    root = manifest.checkpoint_root
    pattern = manifest.local.step_pattern
    path = find_checkpoint(root, pattern, step)
    if path is None:
        kind = "file" if pattern.endswith(WEIGHT_SUFFIXES) else "folder"
        raise CircuitsError(f"{root / pattern.format(step=step)}: missing checkpoint {kind} for step {step} of {manifest.name}")
    if not path.resolve().is_relative_to(root):
        raise CircuitsError(f"{path}: a symbolic link leading outside the run's folder ({path.resolve()}); "
                            "checkpoints must lie inside it")
    return path


def checkpoint_dir(manifest: Manifest, step: int) -> Path:
    """A folder that boots step ``step``: its own checkpoint folder, or the safetensors conversion of
    what the run holds there (a weights file, a PyTorch state dict, nanoGPT's ckpt.pt: circuits.convert)."""
    return bootable_folder(checkpoint_path(manifest, step), manifest.checkpoint_root, step)


def load(manifest: Manifest | str | Path, step: int, device: str = "cpu"):
    """The checkpoint at ``step`` of a run, as an eval-mode ``TransformerBridge``."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    manifest.require_step(step)
    if manifest.source == "hub":
        return _boot_hub(manifest, step, device)
    path = checkpoint_dir(manifest, step)
    config = read_checkpoint_config(path)
    if config.get("format") == NATIVE_FORMAT:
        module, config = load_native_module(path, device)
        return bridge_native_module(module, config["tl_config"], name=f"{manifest.name}@{step}")
    if "architectures" in config or "model_type" in config:
        if not any(path.glob("*.safetensors")):  # never let transformers fall back to pickled weights
            found = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")))
            raise CircuitsError(f"{path}: no .safetensors weights (checkpoints load only from safetensors, "
                                f"pickled weights are never opened{': found ' + found if found else ''})")
        return boot_transformers(str(path), None, device, where=str(path))
    raise CircuitsError(f"{path / 'config.json'}: neither a circuits-native checkpoint nor a Hugging Face config")


def _boot_hub(manifest: Manifest, step: int, device: str):
    assert manifest.hub is not None  # guaranteed by the schema
    revision = manifest.hub.revision(step)
    return boot_transformers(manifest.hub.repo, revision, device, where=f"{manifest.hub.repo}@{revision}")


def random_gptneox(device: str = "cpu", seed: int = 0, **config):
    """A randomly initialised GPTNeoX (``config``: ``GPTNeoXConfig`` fields), saved as a Hugging
    Face folder and booted exactly as a local Pythia-style checkpoint is: for benchmarks."""
    import tempfile

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="circuits-gptneox-") as tmp:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
            GPTNeoXForCausalLM(GPTNeoXConfig(**config)).eval().save_pretrained(tmp)
        return boot_transformers(tmp, None, device, where=tmp)


def boot_transformers(name: str, revision: str | None, device: str, where: str):
    """A Hugging Face model (Hub name with ``revision``, or a local folder) as an eval-mode bridge;
    errors name ``where``."""
    from safetensors import SafetensorError
    from transformer_lens.model_bridge import TransformerBridge

    kwargs = {"device": device}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        # Loading bars from transformers go to stderr; keep our own output readable.
        with contextlib.redirect_stderr(io.StringIO()):
            bridge = TransformerBridge.boot_transformers(name, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        # Damaged or mismatched weights raise RuntimeError / SafetensorError in transformers.
        first = first_line(err, 240)
        hint = "; with no network it must already be in the Hugging Face cache ($HF_HOME/hub)" if revision else ""
        # From the Hub, an OSError may be the network: worth another attempt.
        error = RetryableError if revision is not None and isinstance(err, OSError) else CircuitsError
        raise error(f"{where}: cannot load this checkpoint ({first}){hint}") from None
    if revision is None and Path(name).is_dir() and not any((Path(name) / f).exists() for f in TOKENIZER_FILES):
        # With no tokenizer files, transformers builds an empty placeholder (1-2 tokens) that
        # would pass for the model's vocabulary (head-detector probes drawn from 2 ids): a folder
        # without a tokenizer has none, as a native run.
        bridge.tokenizer = None
    return bridge.eval()
