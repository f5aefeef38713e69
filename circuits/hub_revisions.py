"""A manifest from a Hub repo's revision (branch) names: the suites that keep checkpoints as branches.

Each checkpointed suite names its branches its own way; :data:`SCHEMES` knows them:

==============  =================================  ==========================================
suite           example                            step / tokens
==============  =================================  ==========================================
Pythia          ``step1000``                       step 1000
OLMo            ``step1000-tokens4B``              step 1000, 4e9 tokens (rounded by AI2)
OLMo-2 / 3      ``stage1-step1000-tokens3B``       step 1000, 3e9 tokens; one stage at a time
LLM360          ``ckpt_000``                       checkpoint index 0
Stanford CRFM   ``checkpoint-1000``                step 1000 (Hugging Face Trainer's name)
==============  =================================  ==========================================

``main`` (the final model under another name) is skipped. Names no scheme knows are refused.
Tokens come from the names when they carry them; otherwise from the built-in manifest of the
same repo (``checkpoints_manifest/``), which states the suite's batch; otherwise the manifest
cannot be written and the error says what to add.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from circuits.errors import CircuitsError
from circuits.manifest import Manifest, builtin_manifests, load_manifest, parse_manifest

_UNITS = {"M": 10**6, "B": 10**9}


@dataclass(frozen=True)
class Scheme:
    """One suite's branch naming: ``pattern`` gives the groups ``step`` and, when named, ``stage``,
    ``tokens`` and ``unit``; ``revision_format`` rebuilds a name from its step when the scheme is
    that simple (then the manifest needs no per-step map)."""

    name: str
    pattern: re.Pattern[str]
    example: str
    revision_format: str | None = None


SCHEMES: tuple[Scheme, ...] = (
    Scheme("pythia", re.compile(r"step(?P<step>\d+)"), "step1000", "step{step}"),
    Scheme("olmo", re.compile(r"step(?P<step>\d+)-tokens(?P<tokens>\d+)(?P<unit>[MB])"), "step1000-tokens4B"),
    Scheme("olmo-2", re.compile(r"(?P<stage>stage\d+(?:-ingredient\d+)?)-step(?P<step>\d+)-tokens(?P<tokens>\d+)(?P<unit>[MB])"),
           "stage1-step1000-tokens3B"),
    Scheme("llm360", re.compile(r"ckpt_(?P<step>\d+)"), "ckpt_000"),
    Scheme("hf-trainer", re.compile(r"checkpoint-(?P<step>\d+)"), "checkpoint-1000", "checkpoint-{step}"),
)
SKIPPED = frozenset({"main"})


@dataclass(frozen=True)
class Revision:
    """One parsed branch name."""

    name: str
    scheme: str
    step: int
    tokens: int | None = None
    stage: str | None = None


def parse_revision(name: str) -> Revision | None:
    """The step (and tokens, stage) a branch name gives, or None when no scheme knows it."""
    for scheme in SCHEMES:
        match = scheme.pattern.fullmatch(name)
        if match is None:
            continue
        groups = match.groupdict()
        tokens = int(groups["tokens"]) * _UNITS[groups["unit"]] if groups.get("tokens") is not None else None
        return Revision(name, scheme.name, int(groups["step"]), tokens, groups.get("stage"))
    return None


def manifest_from_hub(repo: str, revisions: list[str] | None, *, name: str | None = None,
                      architecture: str | None = None) -> Manifest:
    """A manifest for the Hub repo ``repo`` whose steps are the given revision names (``None``:
    the repo's branches, listed online). Errors are one-line :class:`CircuitsError`."""
    given = list_branches(repo) if revisions is None else [r.strip() for r in revisions if r.strip()]
    names = list(dict.fromkeys(given))  # a name listed twice is one revision
    parsed = _parse_all(repo, names)
    by_step = _one_per_step(repo, parsed)
    steps = sorted(by_step)
    builtin = _builtin_for(repo)
    data: dict = {
        "name": name or _default_name(repo),
        "description": (f"{repo}: {len(steps)} revisions ({parsed[0].scheme} names), "
                        + ("listed on the Hub" if revisions is None else "from a given list")),
        "source": "hub",
        "hub": {"repo": repo, **_revision_fields(parsed[0].scheme, by_step)},
        "architecture": architecture or (builtin.architecture if builtin else None),
        **_token_fields(repo, by_step, builtin),
        "steps": steps,
    }
    return parse_manifest({k: v for k, v in data.items() if v is not None}, origin=f"<hub {repo}>")


def list_branches(repo: str) -> list[str]:
    """The repo's branch names from the Hub; offline, a one-line error saying to pass a list."""
    offline = "with no network, pass the revision names instead (a file, one name per line)"
    if _offline():
        raise CircuitsError(f"{repo}: cannot list the Hub's branches offline (HF_HUB_OFFLINE is set); {offline}")
    from huggingface_hub import list_repo_refs
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        refs = list_repo_refs(repo)
    except RepositoryNotFoundError:
        raise CircuitsError(f"{repo}: no such model repository on the Hugging Face Hub (or it is private)") from None
    except Exception as err:  # noqa: BLE001 - any network or HTTP failure means the same thing here
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CircuitsError(f"{repo}: cannot list the Hub's branches ({first}); {offline}") from None
    return [branch.name for branch in refs.branches]


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a user may set it later in the process.
    from huggingface_hub import is_offline_mode

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return is_offline_mode() or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _parse_all(repo: str, names: list[str]) -> list[Revision]:
    parsed: list[Revision] = []
    for rev_name in names:
        if rev_name in SKIPPED:
            continue
        revision = parse_revision(rev_name)
        if revision is None:
            examples = ", ".join(s.example for s in SCHEMES)
            raise CircuitsError(f"{repo}: revision {rev_name!r} matches no known checkpoint naming "
                                f"(expected one like {examples})")
        parsed.append(revision)
    if not parsed:
        raise CircuitsError(f"{repo}: no checkpoint revisions among {len(names)} names "
                            f"(expected names like {SCHEMES[0].example})")
    first = parsed[0]
    for revision in parsed[1:]:
        if (revision.scheme, revision.stage) != (first.scheme, first.stage):
            # Stages of OLMo-2 restart their step count; two schemes are two runs.
            raise CircuitsError(f"{repo}: revisions {first.name!r} and {revision.name!r} belong to different "
                                "runs or training stages (step counts restart); pass one stage's revisions")
    return parsed


def _one_per_step(repo: str, parsed: list[Revision]) -> dict[int, Revision]:
    by_step: dict[int, Revision] = {}
    for revision in parsed:
        if revision.step in by_step:
            raise CircuitsError(f"{repo}: revisions {by_step[revision.step].name!r} and {revision.name!r} "
                                f"are both step {revision.step}; keep one")
        by_step[revision.step] = revision
    return by_step


def _revision_fields(scheme_name: str, by_step: dict[int, Revision]) -> dict:
    scheme = next(s for s in SCHEMES if s.name == scheme_name)
    fmt = scheme.revision_format
    if fmt is not None and all(r.name == fmt.format(step=s) for s, r in by_step.items()):
        return {"revision_format": fmt}
    return {"revisions": {s: r.name for s, r in sorted(by_step.items())}}


def _token_fields(repo: str, by_step: dict[int, Revision], builtin: Manifest | None) -> dict:
    if all(r.tokens is not None for r in by_step.values()):
        return {"tokens": {s: r.tokens for s, r in sorted(by_step.items())}}
    if builtin is not None and builtin.tokens_per_step is not None:
        return {"tokens_per_step": builtin.tokens_per_step}
    if builtin is not None and builtin.tokens is not None and all(s in builtin.tokens for s in by_step):
        return {"tokens": {s: builtin.tokens[s] for s in sorted(by_step)}}
    example = next(iter(by_step.values())).name
    raise CircuitsError(f"{repo}: revision names like {example!r} carry no token counts and no built-in manifest "
                        "states this run's batch; write tokens_per_step (or a tokens map) into the manifest")


def _builtin_for(repo: str) -> Manifest | None:
    """The built-in manifest of the same Hub repo, if any: it states the suite's batch size."""
    for path in builtin_manifests().values():
        manifest = load_manifest(path)
        if manifest.hub is not None and manifest.hub.repo.lower() == repo.lower():
            return manifest
    return None


def _default_name(repo: str) -> str:
    return re.sub(r"[^\w.-]+", "-", repo.split("/")[-1]).lower()
