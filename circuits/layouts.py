"""Where a local run keeps step N's checkpoint: layouts, the ``{step}`` pattern, detection.

A layout names how checkpoints are laid out in a run folder:

- ``step-folders``: ``step{N}/`` (our own runs; the default),
- ``hf-trainer``: ``checkpoint-{N}/`` (Hugging Face ``Trainer``, with ``trainer_state.json``),
- ``files``: one weights file per step, ``NAME_{N}.safetensors`` (or ``.pt`` / ``.bin``) with a
  ``config.json`` beside them,
- ``pattern``: any other naming, given as a pattern with one ``{step}`` placeholder, matching
  folders or files (``ckpt-{step}``, ``ckpts/model-{step}.safetensors``).

Every layout is a pattern in the end (``step-folders`` is ``step{step}``). A step is found by
the number in the name, so zero padding (``step010``) is read as step 10; two names for one
step are refused rather than guessed between. This module owns the pattern format; the
manifest stores the layout, and ``circuits manifest`` (``manifest_from_folder``) detects it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuits.errors import CircuitsError, short_repr

if TYPE_CHECKING:
    from circuits.manifest import Manifest

LAYOUTS = ("step-folders", "hf-trainer", "files", "pattern")
FIXED_PATTERNS = {"step-folders": "step{step}", "hf-trainer": "checkpoint-{step}"}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")
CONVERTED_DIR = ".circuits-converted"  # circuits.convert's cache; never a checkpoint itself
# NAME_{N}.ext: the `files` layout's shape (NAME may hold underscores: the last _N counts).
_FILE_RE = re.compile(r"^(?P<prefix>.+)_(?P<step>\d+)(?P<ext>\.safetensors|\.pt|\.bin|\.pth)$")


def check_pattern(pattern: str) -> str:
    """A valid step pattern: relative, inside the run folder, exactly one ``{step}``, no other braces."""
    if pattern.count("{step}") != 1:
        raise ValueError("must contain the placeholder {step} exactly once, e.g. 'ckpt-{step}'")
    if "{" in pattern.replace("{step}", "") or "}" in pattern.replace("{step}", ""):
        raise ValueError("may hold no braces other than {step}")
    p = Path(pattern)
    if p.is_absolute() or ".." in p.parts or "\\" in pattern:
        raise ValueError("must be a relative path inside the run's folder (no '..', not absolute)")
    if "*" in pattern or "?" in pattern or "[" in pattern:
        raise ValueError("may hold no wildcards (* ? [): {step} is the only variable part")
    return pattern


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a pattern: the literal parts, and digits for ``{step}``."""
    head, tail = pattern.split("{step}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def scan(root: Path, pattern: str) -> dict[int, list[Path]]:
    """Every path under ``root`` matching ``pattern``, by step (a step with two paths keeps both)."""
    regex = pattern_regex(pattern)
    found: dict[int, list[Path]] = {}
    for path in root.glob(pattern.replace("{step}", "*")):
        rel = path.relative_to(root).as_posix()
        match = regex.fullmatch(rel)
        if match is None or any(part.startswith(".") for part in Path(rel).parts):
            continue  # hidden entries: temporary folders being written, our conversion cache
        found.setdefault(int(match.group(1)), []).append(path)
    return {step: sorted(paths) for step, paths in sorted(found.items())}


def refuse_duplicates(found: dict[int, list[Path]], root: Path) -> None:
    for step, paths in found.items():
        if len(paths) > 1:
            a, b = (p.relative_to(root).as_posix() for p in paths[:2])
            raise CircuitsError(f"{root}: two checkpoints for step {step}: {a} and {b}; keep one (move the other away)")


def find_checkpoint(root: Path, pattern: str, step: int) -> Path | None:
    """The one path holding step ``step`` under ``root`` (any zero padding), or ``None``."""
    found = scan(root, pattern).get(step, [])
    refuse_duplicates({step: found}, root)
    return found[0] if found else None


# ---------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detected:
    """What ``detect`` found in a run folder: the layout, its pattern and each step's path."""

    layout: str
    pattern: str
    paths: dict[int, Path] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted(self.paths)


def _candidates(root: Path) -> dict[str, dict[str, dict[int, list[Path]]]]:
    """Every layout with at least one match: layout -> pattern -> step -> paths."""
    out: dict[str, dict[str, dict[int, list[Path]]]] = {}
    for layout, pattern in FIXED_PATTERNS.items():
        found = {s: [p for p in ps if p.is_dir()] for s, ps in scan(root, pattern).items()}
        found = {s: ps for s, ps in found.items() if ps}
        if found:
            out[layout] = {pattern: found}
    files: dict[str, dict[int, list[Path]]] = {}
    for path in sorted(root.iterdir()):
        match = _FILE_RE.fullmatch(path.name)
        if match and path.is_file():
            files.setdefault(f"{match['prefix']}_{{step}}{match['ext']}", {}).setdefault(
                int(match["step"]), []).append(path)
    if files:
        out["files"] = files
    return out


def detect(root: Path, pattern: str | None = None) -> Detected:
    """The layout of the run folder ``root``; ``pattern``: the user's, which then is the only one looked for."""
    if not root.is_dir():
        raise CircuitsError(f"{root}: not a folder (expected a run folder holding its checkpoints)")
    if pattern is not None:
        try:
            check_pattern(pattern)
        except ValueError as err:
            raise CircuitsError(f"--pattern {short_repr(pattern)}: {err}") from None
        found = scan(root, pattern)
        if not found:
            raise CircuitsError(f"{root}: no checkpoints found matching --pattern {pattern!r}")
        refuse_duplicates(found, root)
        return Detected("pattern", pattern, {s: ps[0] for s, ps in found.items()})
    candidates = _candidates(root)
    kinds = [(layout, pat, found) for layout, by_pattern in candidates.items() for pat, found in by_pattern.items()]
    if not kinds:
        raise CircuitsError(_nothing_found(root))
    if len(kinds) > 1:
        (l1, p1, f1), (l2, p2, f2) = kinds[:2]
        e1, e2 = (next(iter(f.values()))[0].relative_to(root).as_posix() for f in (f1, f2))
        raise CircuitsError(f"{root}: mixed checkpoint layouts, {l1} ({e1}) and {l2} ({e2}); "
                            f"pass --pattern to choose one (e.g. --pattern {p1!r})")
    layout, pat, found = kinds[0]
    refuse_duplicates(found, root)
    return Detected(layout, pat, {s: ps[0] for s, ps in found.items()})


def _nothing_found(root: Path) -> str:
    looked = "step{N}/, checkpoint-{N}/ (Hugging Face Trainer) or NAME_{N}.safetensors|.pt|.bin files"
    hint = "pass --pattern (e.g. 'ckpt-{step}') for another naming"
    if (root / "ckpt.pt").is_file():
        hint = ("ckpt.pt is one nanoGPT checkpoint: keep one per step as step{N}/ckpt.pt or ckpt_{N}.pt "
                "(nanoGPT overwrites it), or " + hint)
    return f"{root}: no checkpoints found (looked for {looked}); {hint}"


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
    from circuits.convert import nanogpt_file, read_nanogpt

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
    from circuits.convert import nanogpt_file

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
    from circuits.manifest import parse_manifest  # manifest.py imports this module's pattern checks

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
