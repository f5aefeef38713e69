"""Run folders in our layout, written from models held in memory: ``from_model``, ``import_weights``
and the ``RunWriter`` that the training helpers (``circuits.training``) share.

A run folder holds ``manifest.yaml`` (a local run listing the steps written so far), one
``step{N}/`` folder per checkpoint, safetensors only (a circuits-native checkpoint,
``circuits.checkpoint``, for a TransformerLens config + state dict; a ``save_pretrained`` folder
for a Hugging Face model), and ``training.done`` once a training job has said it is finished.

Every step folder is built under a temporary name and renamed into place; only then is the
manifest rewritten (a temporary file, then a rename). A reader (``circuits sweep --follow``)
never sees a step before its checkpoint is whole, and nothing already written is replaced:
a step that is there is refused. One writer per run folder at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from circuits.checkpoint import (
    NATIVE_FORMAT,
    new_native_model,
    save_native_checkpoint,
    step_dirname,
    write_text_atomically,
)
from circuits.errors import CircuitsError, first_line, short_repr
from circuits.follow import DONE_MARKER
from circuits.manifest import Manifest, load_manifest, parse_manifest

NATIVE_ARCHITECTURE = "TransformerLensNative"
STEP_INFO = "circuits-step.json"  # beside a Hugging Face checkpoint: which step, how many tokens
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Fields of a TransformerBridgeConfig that describe where it runs, not the model (and do not
# serialise): left out of a bridge's stored tl_config.
_RUNTIME_FIELDS = ("dtype", "device", "n_devices")


# ---------------------------------------------------------------- what a model is


def _is_hf_model(model: Any) -> bool:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _is_bridge(model: Any) -> bool:
    if not hasattr(model, "original_model"):
        return False
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def tl_config_dict(config: Any) -> dict[str, Any]:
    """A TransformerLens config (a mapping, or a ``TransformerBridgeConfig``) as a JSON-able dict."""
    if isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_FIELDS}
    else:
        raise CircuitsError(f"tl_config {short_repr(config)}: expected a mapping of TransformerLens config fields "
                            "(d_model, n_layers, n_heads, d_head, n_ctx, d_vocab, ...) or a TransformerBridgeConfig")
    try:
        json.dumps(data)
    except (TypeError, ValueError) as err:
        raise CircuitsError(f"tl_config: not JSON-serialisable ({first_line(err)}); give plain numbers and strings") from None
    return data


def _unwrapped_state(module: Any) -> dict[str, Any]:
    """A bridged module's weights under its own names: the bridge wraps each submodule, adding
    ``_original_component`` to the names of the weights it holds."""
    return {".".join(p for p in name.split(".") if p != "_original_component"): value
            for name, value in module.state_dict().items()}


def _one_line(err: BaseException, limit: int = 240) -> str:
    return " ".join(str(err).split())[:limit] or type(err).__name__


def _native_module(state: Mapping[str, Any], tl_config: dict[str, Any], where: str, bridged: bool = False):
    """A TL-native module of ``tl_config`` holding ``state`` (checked: every weight, right shapes).

    ``bridged``: ``state`` comes from a bridge, which registers buffers of its own (a zero
    unembedding bias): names the module does not have are left out."""
    try:
        module = new_native_model(tl_config)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as err:
        raise CircuitsError(f"{where}: the TransformerLens config does not describe a model ({first_line(err)})") from None
    return _load_into(module, state, own_names_only=bridged, where=f"{where}: the weights do not match the "
                      "TransformerLens config")


def _hf_module(state: Mapping[str, Any], hf_config: Any, where: str, model_class: Any = None):
    """A Hugging Face causal LM of ``hf_config`` (a ``PretrainedConfig`` or its dict) holding ``state``.

    ``model_class``: the state comes from a bridge over a model of this class, whose modules the
    bridge wrapped and aliased (the same weights under several names): only the class's own
    names are kept."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if isinstance(hf_config, Mapping):
            fields = {k: v for k, v in hf_config.items() if k != "model_type"}
            hf_config = AutoConfig.for_model(str(hf_config["model_type"]), **fields)
        model = AutoModelForCausalLM.from_config(hf_config) if model_class is None else model_class(hf_config)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CircuitsError(f"{where}: the Hugging Face config does not describe a causal LM ({first_line(err)})") from None
    return _load_into(model, state, own_names_only=model_class is not None,
                      where=f"{where}: the weights do not match the Hugging Face config")


def _load_into(module: Any, state: Mapping[str, Any], own_names_only: bool, where: str) -> Any:
    """``module`` holding ``state`` (strictly), in eval mode. ``own_names_only``: a bridge's
    state holds the same weights under its aliases too; keep the module's own names."""
    if own_names_only:
        expected = module.state_dict().keys()
        state = {k: v for k, v in state.items() if k in expected}
    try:
        module.load_state_dict(dict(state), strict=True)
    except (RuntimeError, TypeError) as err:
        raise CircuitsError(f"{where} ({_one_line(err)})") from None
    return module.eval()


def _is_hf_config(config: Any) -> bool:
    if isinstance(config, Mapping):
        return "model_type" in config
    return hasattr(config, "model_type") and hasattr(config, "to_json_string")


# ---------------------------------------------------------------- the run folder


def _manifest_name(run_dir: Path) -> str:
    return re.sub(r"[^\w.-]+", "-", run_dir.resolve().name).strip("-") or "run"


def _whole(value: Any, at_least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


class RunWriter:
    """Adds checkpoints to a run folder of our layout, one step at a time (see the module doc).

    A new folder needs ``tokens_per_step``; an existing run keeps its own (a different value is
    refused), its name and its architecture: every step of a run is the same kind of model.
    """

    def __init__(self, run_dir: str | Path, *, tokens_per_step: int | None = None, name: str | None = None,
                 description: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.manifest_path = self.run_dir / "manifest.yaml"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise CircuitsError(f"{self.run_dir}: exists and is not a folder")
        if tokens_per_step is not None and not _whole(tokens_per_step, at_least=1):
            raise CircuitsError(f"tokens_per_step {tokens_per_step!r}: expected a whole number >= 1 (tokens each "
                                "training step saw: batch size x sequence length)")
        self.existing: Manifest | None = None
        if self.manifest_path.exists():
            self.existing = load_manifest(self.manifest_path)
            if self.existing.source != "local" or self.existing.local is None or self.existing.local.path != ".":
                raise CircuitsError(f"{self.manifest_path}: not a run folder of our layout (source local, path '.'); "
                                    "write the model into an empty folder")
            if tokens_per_step is not None and tokens_per_step != self.existing.tokens_per_step:
                raise CircuitsError(f"{self.manifest_path}: this run has tokens_per_step {self.existing.tokens_per_step}, "
                                    f"not {tokens_per_step}; write into another folder")
        elif self.run_dir.exists() and any(not p.name.startswith(".") for p in self.run_dir.iterdir()):
            raise CircuitsError(f"{self.run_dir}: folder is not empty and holds no run manifest; choose an empty folder")
        elif tokens_per_step is None:
            raise CircuitsError(f"{self.run_dir}: a new run needs tokens_per_step (tokens each training step saw: "
                                "batch size x sequence length)")
        if self.existing is not None and self.existing.tokens_per_step is None:
            raise CircuitsError(f"{self.manifest_path}: this run gives tokens per step as a map (field 'tokens'); "
                                "steps can be added only to a run with tokens_per_step: write into another folder")
        self.tokens_per_step: int = (self.existing.tokens_per_step or 0) if self.existing is not None \
            else int(tokens_per_step or 0)
        self.name = self.existing.name if self.existing is not None else (name or _manifest_name(self.run_dir))
        self.description = self.existing.description if self.existing is not None else description
        self.architecture = self.existing.architecture if self.existing is not None else None
        self.steps: list[int] = list(self.existing.steps) if self.existing is not None else []

    @property
    def finished(self) -> bool:
        return (self.run_dir / DONE_MARKER).exists()

    def has(self, step: int) -> bool:
        return step in self.steps or (self.run_dir / step_dirname(step)).exists()

    def add(self, model: Any, step: int, *, config: Any = None, tokenizer: Any = None) -> Path:
        """Write ``model`` as checkpoint ``step`` and list it in the manifest; returns its folder.

        ``model``: a Hugging Face model, a TransformerBridge, a TL-native module with its
        ``config`` (TransformerLens), or a state dict with its ``config`` (TransformerLens, or a
        Hugging Face config or its dict, which has ``model_type``).
        """
        if not _whole(step, at_least=0):
            raise CircuitsError(f"step {step!r}: expected a whole number >= 0")
        if self.finished:
            raise CircuitsError(f"{self.run_dir}: this run is finished ({DONE_MARKER} is there); remove that file to "
                                "add checkpoints")
        if self.has(step):
            raise CircuitsError(f"{self.run_dir / step_dirname(step)}: step {step} is already in this run; "
                                "checkpoints are never overwritten")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kind, payload = self._what(model, config, tokenizer, where=f"step {step}")
        architecture = NATIVE_ARCHITECTURE if kind == "native" else _hf_architecture(payload[0])
        if self.architecture is not None and architecture != self.architecture:
            raise CircuitsError(f"{self.manifest_path}: this run's checkpoints are {self.architecture}, step {step} "
                                f"is {architecture}; write it into another folder")
        meta = {"step": step, "tokens_seen": step * self.tokens_per_step, "run": self.name,
                "written": datetime.now(UTC).isoformat(timespec="seconds")}
        if kind == "native":
            module, tl_config = payload
            path = save_native_checkpoint(module, tl_config, self.run_dir, meta)
        else:
            path = self._save_hf(payload[0], payload[1], step, meta)
        self.architecture = architecture
        self.steps = sorted({*self.steps, step})
        self._write_manifest()
        return path

    def finish(self) -> None:
        """Say the run is over (``training.done``, written last): a follower stops once it has the rest."""
        if not self.finished:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.run_dir / DONE_MARKER, json.dumps(
                {"steps": len(self.steps), "last_step": self.steps[-1] if self.steps else None,
                 "finished": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")

    # -- internals
    def _what(self, model: Any, config: Any, tokenizer: Any, where: str) -> tuple[str, tuple[Any, Any]]:
        """("native", (module, tl_config)) or ("hf", (model, tokenizer)), checked."""
        if _is_hf_model(model):
            return "hf", (model, tokenizer)
        if _is_bridge(model):
            inner = model.original_model
            if _is_hf_model(inner):
                fresh = _hf_module(_unwrapped_state(inner), inner.config, where, model_class=type(inner))
                return "hf", (fresh, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None))
            tl_config = tl_config_dict(model.cfg)
            return "native", (_native_module(_unwrapped_state(inner), tl_config, where, bridged=True), tl_config)
        if isinstance(model, Mapping):
            if config is None:
                raise CircuitsError(f"{where}: a state dict needs its config (a TransformerLens config, or a Hugging "
                                    "Face config with model_type)")
            if _is_hf_config(config):
                return "hf", (_hf_module(model, config, where), tokenizer)
            tl_config = tl_config_dict(config)
            return "native", (_native_module(model, tl_config, where), tl_config)
        if hasattr(model, "state_dict"):
            if config is None:
                raise CircuitsError(f"{where}: a {type(model).__name__} needs its TransformerLens config (tl_config) "
                                    "to be written as a circuits-native checkpoint")
            tl_config = tl_config_dict(config)
            _native_module(model.state_dict(), tl_config, where)  # refused here, not when booted
            return "native", (model, tl_config)
        raise CircuitsError(f"{where}: {type(model).__name__} is not a model; expected a Hugging Face model, a "
                            "TransformerBridge, a TL-native module with its config, or a state dict with its config")

    def _save_hf(self, model: Any, tokenizer: Any, step: int, meta: dict[str, Any]) -> Path:
        import contextlib
        import io

        final = self.run_dir / step_dirname(step)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.run_dir))
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # transformers' "Writing model shards" bar
                model.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            (tmp / STEP_INFO).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left under a step's name
            raise
        return final

    def _write_manifest(self) -> None:
        data = {"name": self.name, "description": self.description, "source": "local",
                "local": {"path": "."}, "architecture": self.architecture,
                "tokens_per_step": self.tokens_per_step, "steps": self.steps}
        if self.existing is not None and self.existing.local is not None:  # keep what the run said of itself
            data["local"] = self.existing.local.model_dump(exclude_none=True)
        manifest = parse_manifest(data, origin=str(self.manifest_path))
        write_text_atomically(self.manifest_path, manifest.to_yaml())


def _hf_architecture(model: Any) -> str:
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    return str(names[0])


# ---------------------------------------------------------------- bring a model


def from_model(model: Any, out: str | Path, *, step: int, config: Any = None, tokens_per_step: int | None = None,
               tokenizer: Any = None, name: str | None = None, description: str = "") -> Manifest:
    """Write ``model`` as checkpoint ``step`` of the run folder ``out``; returns its manifest.

    ``model``: a Hugging Face model (saved with ``save_pretrained``), a TransformerBridge (its
    Hugging Face model, or for a TL-native bridge its module and config), a TL-native module
    with its TransformerLens ``config``, or a state dict with its ``config`` (TransformerLens,
    or Hugging Face). A new folder needs ``tokens_per_step``. Call it again with another step
    to add that step; a step already there is refused. Then ``circuits.load(manifest, step)``
    or ``circuits sweep OUT`` as for any run.
    """
    writer = RunWriter(out, tokens_per_step=tokens_per_step, name=name, description=description)
    writer.add(model, step, config=config, tokenizer=tokenizer)
    return load_manifest(writer.manifest_path)


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Weights from a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` file read with
    ``torch.load(weights_only=True)`` (tensors and plain containers only: nothing else is
    unpickled). A training checkpoint holding the weights under ``model`` or ``state_dict``
    gives those; ``_orig_mod.`` (``torch.compile``) is taken off the names."""
    import torch

    from circuits.convert import safe_torch_load, state_dict_of

    path = Path(path)
    if not path.is_file():
        raise CircuitsError(f"{path}: no such weights file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CircuitsError(f"{path}: expected weights as {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as err:
            raise CircuitsError(f"{path}: damaged safetensors file ({first_line(err)})") from None
    data = safe_torch_load(path)  # tensors and plain values only: nothing in the file runs
    if isinstance(data, Mapping) and not all(isinstance(v, torch.Tensor) for v in data.values()):
        inner = next((data[k] for k in ("model", "state_dict") if isinstance(data.get(k), Mapping)), None)
        data = inner if inner is not None else data
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict_of(data, path).items()}


def read_config(path: str | Path) -> dict[str, Any]:
    """A model config from JSON: a TransformerLens config, a circuits-native ``config.json``
    (its ``tl_config``), or a Hugging Face ``config.json`` (it has ``model_type``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise CircuitsError(f"{path}: cannot read the config ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError):
        raise CircuitsError(f"{path}: not a JSON file") from None
    if not isinstance(data, dict):
        raise CircuitsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") == NATIVE_FORMAT:
        if not isinstance(data.get("tl_config"), dict):
            raise CircuitsError(f"{path}: field 'tl_config' is missing or not a mapping")
        return dict(data["tl_config"])
    return data


def import_weights(weights: str | Path, config: str | Path, out: str | Path, *, step: int,
                   tokens_per_step: int | None = None, name: str | None = None) -> Manifest:
    """``circuits import-weights``: a weights file and its config JSON, as step ``step`` of ``out``."""
    state = read_state_dict(weights)
    return from_model(state, out, step=step, config=read_config(config), tokens_per_step=tokens_per_step, name=name)
