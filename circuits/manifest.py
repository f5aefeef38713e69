"""Run manifests: one YAML file per checkpointed training run, validated by a schema.

A manifest says where a run's checkpoints live (the Hugging Face Hub or a local folder),
which steps exist, how many tokens each step saw and, for built-in runs, the recipe and seed
that reproduce it. Every later stage (loading, sweeps, studies) starts from one.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from circuits.errors import CircuitsError
from circuits.layouts import FIXED_PATTERNS, check_pattern
from circuits.steps import PYTHIA_STEPS


def _manifest_dir() -> Path:
    """The built-in manifests: the data package ``circuits_manifests`` where circuits is installed
    (a wheel, or ``pip install -e``), else ``checkpoints_manifest/`` beside the package (a
    checkout on ``PYTHONPATH``, not installed)."""
    try:
        return Path(str(resources.files("circuits_manifests")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "checkpoints_manifest"


MANIFEST_DIR = _manifest_dir()
NAMED_SCHEDULES = {"pythia-154": PYTHIA_STEPS}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A Hub revision (branch) name: what a Hub repo's branches look like, and nothing that could
# step outside the cache's refs/ folder ("..", a leading "/") or break a one-line message.
_REVISION_NAME = re.compile(r"^[A-Za-z0-9][\w.\-/]*$")


class HubSource(_Strict):
    repo: Annotated[str, Field(pattern=r"^[\w.-]+/[\w.-]+$")]
    revision_format: str = "step{step}"
    # Per-step revision names, for suites whose branch names are not one pattern of the step
    # (OLMo's step1000-tokens4B, LLM360's ckpt_000); when given, it is what revision() reads.
    # Manifest checks that it covers every step of the run.
    revisions: dict[Annotated[int, Field(ge=0)], str] | None = None

    @field_validator("revision_format")
    @classmethod
    def _has_step_placeholder(cls, value: str) -> str:
        if "{step}" not in value:
            raise ValueError("must contain the placeholder {step}, e.g. 'step{step}'")
        return value

    @field_validator("revisions")
    @classmethod
    def _names_are_branch_names(cls, value: dict[int, str] | None) -> dict[int, str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must map at least one step to a revision name (or leave revisions out)")
        seen: dict[str, int] = {}
        for step, name in sorted(value.items()):
            if not _REVISION_NAME.match(name) or ".." in name:
                raise ValueError(f"step {step}: {name!r} is not a revision name (letters, digits, '_', '-', '.', '/'; "
                                 "e.g. 'step1000-tokens4B')")
            if name in seen:
                raise ValueError(f"steps {seen[name]} and {step} both name revision {name!r}: each step needs its own")
            seen[name] = step
        return value

    def revision(self, step: int) -> str:
        if self.revisions is not None:
            return self.revisions[step]
        return self.revision_format.format(step=step)


class LocalSource(_Strict):
    path: str = "."
    # Where step N's checkpoint lies in the folder (circuits.layouts): step{N}/ by default.
    layout: Literal["step-folders", "hf-trainer", "files", "pattern"] = "step-folders"
    pattern: str | None = None  # with {step}; given for the layouts files and pattern only
    recipe: str | None = None
    seed: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _stays_relative(cls, value: str) -> str:
        # Manifests are shared between people: a path must not reach outside its own folder.
        p = Path(value)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError("must be a relative path inside the manifest's folder (no '..', not absolute)")
        return value

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        return value if value is None else check_pattern(value)

    @model_validator(mode="after")
    def _pattern_matches_layout(self) -> LocalSource:
        if self.layout in FIXED_PATTERNS and self.pattern is not None:
            raise ValueError(f"'pattern' applies to the layouts files and pattern; layout {self.layout} "
                             f"is always {FIXED_PATTERNS[self.layout]!r}")
        if self.layout not in FIXED_PATTERNS and self.pattern is None:
            raise ValueError(f"layout {self.layout} needs field 'pattern' (with {{step}}, e.g. 'model_{{step}}.safetensors')")
        return self

    @property
    def step_pattern(self) -> str:
        """The pattern of step N's checkpoint path, relative to the run folder."""
        return self.pattern if self.pattern is not None else FIXED_PATTERNS[self.layout]


class Manifest(_Strict):
    name: Annotated[str, Field(pattern=r"^[\w.-]+$")]
    description: str = ""
    source: Literal["hub", "local"]
    hub: HubSource | None = None
    local: LocalSource | None = None
    architecture: str | None = None
    # Tokens seen: a constant number per step, or a map {step: tokens seen} (exactly one of the two).
    tokens_per_step: Annotated[int, Field(ge=1)] | None = None
    tokens: dict[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None = None
    steps: list[Annotated[int, Field(ge=0)]]
    # Set by load_manifest: the file this manifest was read from (for relative paths).
    origin: str | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _named_schedule(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in NAMED_SCHEDULES:
                raise ValueError(f"unknown schedule {value!r}; expected a list of steps or one of {sorted(NAMED_SCHEDULES)}")
            return NAMED_SCHEDULES[value]
        return value

    @field_validator("steps")
    @classmethod
    def _sorted_unique(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("must list at least one step")
        if sorted(set(value)) != value:
            raise ValueError("must be strictly increasing (sorted, no repeats)")
        return value

    @model_validator(mode="after")
    def _source_matches(self) -> Manifest:
        if self.source == "hub" and self.hub is None:
            raise ValueError("source is 'hub' but the 'hub' section (repo, revision_format) is missing")
        if self.source == "local" and self.local is None:
            raise ValueError("source is 'local' but the 'local' section (path, recipe, seed) is missing")
        return self

    @model_validator(mode="after")
    def _tokens_given_once(self) -> Manifest:
        if (self.tokens_per_step is None) == (self.tokens is None):
            raise ValueError("give exactly one of tokens_per_step (tokens per step) and tokens "
                             "(a map {step: tokens seen}), not " + ("both" if self.tokens is not None else "neither"))
        if self.tokens is not None:
            missing = [s for s in self.steps if s not in self.tokens]
            extra = sorted(set(self.tokens) - set(self.steps))
            if missing:
                raise ValueError(f"field 'tokens' has no value for {len(missing)} of the steps "
                                 f"(first: {missing[:3]}); it must cover every step")
            if extra:
                raise ValueError(f"field 'tokens' names steps that are not in 'steps' (first: {extra[:3]})")
        return self

    @model_validator(mode="after")
    def _revisions_cover_steps(self) -> Manifest:
        revisions = self.hub.revisions if self.hub is not None else None
        if revisions is not None:
            missing = next((s for s in self.steps if s not in revisions), None)
            if missing is not None:
                raise ValueError(f"hub.revisions has no revision for step {missing} "
                                 f"(it must name one for every step of steps; {len(self.steps)} steps)")
        return self

    @property
    def checkpoint_root(self) -> Path:
        """Folder holding a local run's checkpoints (``step{N}/`` or another ``local.layout``)."""
        if self.local is None:
            raise CircuitsError(f"manifest {self.name}: a hub run has no local checkpoint folder")
        base = (Path(self.origin).parent if self.origin else Path.cwd()).resolve()
        root = (base / self.local.path).resolve()
        if not root.is_relative_to(base):  # a symlink on the way points elsewhere
            raise CircuitsError(f"manifest {self.name}: local.path {self.local.path!r} leads outside the manifest's "
                                f"folder {base} (to {root}, through a symbolic link); copy or move the checkpoints there")
        return root

    def tokens_seen(self, step: int) -> int:
        if self.tokens is not None:
            self.require_step(step)
            return self.tokens[step]
        assert self.tokens_per_step is not None  # guaranteed by the schema
        return step * self.tokens_per_step

    def require_step(self, step: int) -> None:
        if step not in self.steps:
            raise CircuitsError(
                f"manifest {self.name}: step {step} is not in the run "
                f"({len(self.steps)} steps from {self.steps[0]} to {self.steps[-1]})"
            )

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude={"origin"})
        if data.get("local", {}).get("layout") == "step-folders":
            del data["local"]["layout"]  # the default: manifests written before layouts read the same
        return yaml.safe_dump(data, sort_keys=False)


def parse_manifest(data: Any, origin: str = "<manifest>") -> Manifest:
    """Validate a mapping as a manifest; errors name the origin and the field."""
    if not isinstance(data, dict):
        raise CircuitsError(f"{origin}: expected a YAML mapping at the top level, got {type(data).__name__}")
    try:
        return Manifest.model_validate({**data, "origin": origin})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        where = f"field '{field}': " if field else ""  # model-level checks name their fields
        message = first["msg"].removeprefix("Value error, ")
        extra = f" (got {first['input']!r})" if first["type"] != "missing" and not isinstance(first["input"], dict) else ""
        # One line, whatever the file holds (a key may contain a newline).
        text = "\\n".join(f"{origin}: {where}{message}{extra}".splitlines())
        raise CircuitsError(text[:400]) from None


def load_manifest(path_or_name: str | Path) -> Manifest:
    """Read a manifest from a YAML path, a run folder holding ``manifest.yaml``, or a built-in name."""
    path = _resolve(path_or_name)
    try:
        text = path.read_text()
    except OSError as err:
        raise CircuitsError(f"{path}: cannot read manifest ({err.strerror})") from None
    except UnicodeDecodeError:
        raise CircuitsError(f"{path}: not a text file (manifests are UTF-8 YAML)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CircuitsError(f"{path}: not valid YAML{where}") from None
    return parse_manifest(data, origin=str(path))


def builtin_manifests() -> dict[str, Path]:
    return {p.stem: p for p in sorted(MANIFEST_DIR.glob("*.yaml"))}


def _resolve(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.is_dir():
        path = path / "manifest.yaml"
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    known = builtin_manifests()
    if str(path_or_name) in known:
        return known[str(path_or_name)]
    raise CircuitsError(
        f"manifest {str(path_or_name)!r}: no such file, run folder or built-in manifest "
        f"(built-in: {', '.join(known)})"
    )
