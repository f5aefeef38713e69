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
manifest stores the layout, and ``circuits manifest`` (``circuits.folder_manifest``) detects it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from circuits.errors import CircuitsError, short_repr

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
        if match and path.is_file() and not path.name.startswith("."):
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
