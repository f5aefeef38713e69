"""A manifest for a run folder as it is: ``circuits manifest DIR``.

The layout and steps come from ``circuits.layouts.detect``; tokens seen from what the run's own
files say, in this order: the user's ``--tokens-per-step``; a Hugging Face Trainer's
``trainer_state.json`` (``num_input_tokens_seen``, per checkpoint); a circuits-native run's
``config.json`` (``tokens_seen``); a nanoGPT checkpoint's ``config`` (batch size x block size
x gradient accumulation). When none says, the command asks for ``--tokens-per-step``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits.convert import nanogpt_file, read_nanogpt
from circuits.errors import CircuitsError
from circuits.layouts import Detected, detect
from circuits.manifest import Manifest, parse_manifest

# ---------------------------------------------------------------- tokens seen


@dataclass(frozen=True)
class Tokens:
    """Tokens seen, as the manifest will hold them: one of ``per_step`` and ``by_step``, and where from."""

    per_step: int | None = None
    by_step: dict[int, int] | None = None
    source: str = ""


def hf_trainer_tokens(detected: Detected) -> Tokens | None:
    """Tokens seen at each ``checkpoint-{N}/`` from ``trainer_state.json``, when the Trainer counted them.

    Each checkpoint's own state holds ``num_input_tokens_seen`` at its step (0 there means not
    counted: ``include_num_input_tokens_seen`` was off); the last checkpoint's ``log_history``
    entries carry it per logged step. ``None`` when a step stays unknown."""
    last_step = detected.steps[-1]
    last = _trainer_state(detected.paths[last_step])
    if last is not None and last.get("global_step") not in (None, last_step):
        raise CircuitsError(f"{detected.paths[last_step] / 'trainer_state.json'}: global_step is "
                            f"{last.get('global_step')!r} in the folder of step {last_step}")
    logged = {}
    for entry in (last or {}).get("log_history", []):
        if isinstance(entry, dict) and _count(entry.get("num_input_tokens_seen")) and isinstance(entry.get("step"), int):
            logged[entry["step"]] = int(entry["num_input_tokens_seen"])
    by_step: dict[int, int] = {}
    for step, path in detected.paths.items():
        own = _trainer_state(path) or {}
        seen = own.get("num_input_tokens_seen")
        if isinstance(seen, int) and _count(seen) and own.get("global_step") == step:
            by_step[step] = seen
        elif step in logged:
            by_step[step] = logged[step]
        elif step == 0:
            by_step[step] = 0
        else:
            return None
    return Tokens(by_step=by_step, source="trainer_state.json (num_input_tokens_seen)")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _trainer_state(folder: Path) -> dict[str, Any] | None:
    path = folder / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CircuitsError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CircuitsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def nanogpt_tokens(detected: Detected) -> Tokens | None:
    """Tokens per step of a nanoGPT run, from its last checkpoint's ``config``; ``None`` if not nanoGPT."""
    last = nanogpt_file(detected.paths[detected.steps[-1]])
    if last is None:
        return None
    per_step = read_nanogpt(last).tokens_per_step
    if per_step is None:
        return None
    return Tokens(per_step=per_step, source=f"{last.name} config (batch_size x block_size x gradient_accumulation_steps)")


def native_tokens(detected: Detected) -> Tokens | None:
    """Tokens seen at each ``step{N}/`` of a circuits-native run (its ``config.json`` ``tokens_seen``)."""
    by_step = {}
    for step, path in detected.paths.items():
        config = path / "config.json"
        try:
            seen = json.loads(config.read_text()).get("tokens_seen") if config.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        if not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
            return None
        by_step[step] = seen
    return Tokens(by_step=by_step, source="config.json (tokens_seen)")


def find_tokens(detected: Detected, tokens_per_step: int | None, root: Path) -> Tokens:
    """The run's tokens seen: the user's ``--tokens-per-step`` first, else what the run's files say."""
    if tokens_per_step is not None:
        if tokens_per_step < 1:
            raise CircuitsError(f"--tokens-per-step {tokens_per_step}: expected a positive number of tokens")
        return Tokens(per_step=tokens_per_step, source="--tokens-per-step")
    readers = {"hf-trainer": hf_trainer_tokens, "step-folders": native_tokens}
    found = readers.get(detected.layout, lambda d: None)(detected) or nanogpt_tokens(detected)
    if found is not None:
        return found
    where = {"hf-trainer": "trainer_state.json has no num_input_tokens_seen for every checkpoint "
                           "(train with include_num_input_tokens_seen to record it)"}.get(
        detected.layout, "the checkpoints do not say how many tokens each step saw")
    raise CircuitsError(f"{root}: {where}; pass --tokens-per-step T (tokens per optimizer step: batch size x "
                        "sequence length x gradient accumulation x devices)")


# ---------------------------------------------------------------- the manifest


def architecture_of(path: Path) -> str | None:
    """The Hugging Face architecture named by a checkpoint's ``config.json`` (beside a file, or inside a folder)."""
    if nanogpt_file(path) is not None:
        return "GPT2LMHeadModel"  # converted to a GPT-2 folder when loaded
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and data.get("format") == "circuits-native/1":
        return "TransformerLensNative"
    names = data.get("architectures") if isinstance(data, dict) else None
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None


def default_name(root: Path) -> str:
    """A manifest name from the folder's name (letters, digits, '.', '-', '_')."""
    name = re.sub(r"[^\w.-]+", "-", root.resolve().name).strip("-")
    return name or "run"


def manifest_from_folder(root: Path, *, path: str = ".", pattern: str | None = None, name: str | None = None,
                         tokens_per_step: int | None = None) -> Manifest:
    """A manifest for the run in ``root``: its layout and steps detected, its tokens read or given.

    ``path``: ``root`` as the manifest will name it, relative to the manifest file's folder."""
    detected = detect(root, pattern)
    tokens = find_tokens(detected, tokens_per_step, root)
    local: dict[str, Any] = {"path": path}
    if detected.layout != "step-folders":
        local["layout"] = detected.layout
    if detected.layout in ("files", "pattern"):
        local["pattern"] = detected.pattern
    data: dict[str, Any] = {
        "name": name or default_name(root),
        "description": f"{len(detected.steps)} checkpoints found in {root.resolve().name}/ "
                       f"({detected.layout}: {detected.pattern}); tokens from {tokens.source}",
        "source": "local",
        "local": local,
        "architecture": architecture_of(detected.paths[detected.steps[-1]]),
        "steps": detected.steps,
    }
    data |= {"tokens_per_step": tokens.per_step} if tokens.per_step is not None else {"tokens": tokens.by_step}
    return parse_manifest({k: v for k, v in data.items() if v is not None}, origin=f"{root} (detected)")
