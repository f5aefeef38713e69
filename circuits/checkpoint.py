"""Checkpoint folders of built-in runs: ``step{N}/config.json`` + ``model.safetensors``.

The layout mirrors a Hugging Face snapshot (config beside safetensors weights), so a local
run and a Pythia revision are both "a folder per step". Weights are safetensors only:
nothing read from a checkpoint is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from circuits.errors import CircuitsError, first_line

NATIVE_FORMAT = "circuits-native/1"


def step_dirname(step: int) -> str:
    return f"step{step}"


def new_native_model(tl_config: dict[str, Any]) -> torch.nn.Module:
    """A bare TL-native module (no bridge): what the recipes train, fast and simple."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native.init import initialize_native_model
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    cfg = TransformerBridgeConfig.from_dict(dict(tl_config))
    model = NativeModel(cfg)
    initialize_native_model(model, cfg)
    return model


def save_native_checkpoint(
    model: torch.nn.Module, tl_config: dict[str, Any], out_dir: Path, meta: dict[str, Any]
) -> Path:
    """Write one step folder atomically (temporary name, then rename)."""
    final = out_dir / step_dirname(int(meta["step"]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": NATIVE_FORMAT})
    config = {"format": NATIVE_FORMAT, "tl_config": tl_config, **meta}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, final) if not final.exists() else _replace_dir(tmp, final)
    return final


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed into place: a reader (a follower
    polling a run's manifest) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    import shutil

    shutil.rmtree(final)
    os.replace(tmp, final)


def read_checkpoint_config(step_dir: Path) -> dict[str, Any]:
    path = step_dir / "config.json"
    if not path.is_file():
        raise CircuitsError(f"{step_dir}: missing checkpoint (no config.json in this folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CircuitsError(f"{path}: not valid JSON (line {err.lineno})") from None
    except UnicodeDecodeError:
        raise CircuitsError(f"{path}: not a text file") from None
    if not isinstance(config, dict):
        raise CircuitsError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_native_module(step_dir: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    config = read_checkpoint_config(step_dir)
    if config.get("format") != NATIVE_FORMAT:
        raise CircuitsError(f"{step_dir / 'config.json'}: field 'format' is {config.get('format')!r}, expected {NATIVE_FORMAT!r}")
    weights = step_dir / "model.safetensors"
    if not weights.is_file():
        raise CircuitsError(f"{step_dir}: missing model.safetensors (checkpoints load only from safetensors)")
    if not isinstance(config.get("tl_config"), dict):
        raise CircuitsError(f"{step_dir / 'config.json'}: field 'tl_config' is missing or not a mapping")
    try:
        model = new_native_model(config["tl_config"])
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as err:
        first = first_line(err, 200)
        raise CircuitsError(f"{step_dir / 'config.json'}: field 'tl_config' does not describe a model ({first})") from None
    try:
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, SafetensorError) as err:
        first = first_line(err, 200)
        raise CircuitsError(f"{weights}: damaged, or does not match its config.json ({first})") from None
    return model.to(device).eval(), config


def bridge_native_module(model: torch.nn.Module, tl_config: dict[str, Any], name: str):
    """Wrap a trained native module in a TransformerBridge (hooks, run_with_cache, weights)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    cfg = TransformerBridgeConfig.from_dict(dict(tl_config))
    bridge = build_bridge_from_module(
        model, architecture="TransformerLensNative", tl_config=cfg, model_name=name
    )
    return bridge.eval()
