"""The sweep: visit every selected checkpoint once and land one shard per step.

Reads top to bottom as the recipe: ``sweep`` checks its settings (``SweepConfig``), resolves
the steps and the study folder, then hands each pending step to an executor
(``circuits.executors``: this process, or Ray tasks), whose ``run_step`` loads the checkpoint,
calls ``circuits.visit.visit_step`` (the one function later features extend) and lands the
shard; the driver rebuilds the index as shards land. Writes run on a background thread so they
overlap the next batch's forward pass; memory is bounded by the batch (plus at most two batches
queued for writing).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from circuits import faults, store
from circuits.config import DEFAULT_HOOKS, SweepConfig
from circuits.errors import CircuitsError
from circuits.executors import (
    Executor,
    LocalExecutor,
    StepResult,
    StepSpec,
    make_executor,
)
from circuits.graph import GraphSpec
from circuits.manifest import Manifest, load_manifest
from circuits.steps import select_steps, spread_steps
from circuits.task_files import resolve_task, task_name_of
from circuits.tasks import Task
from circuits.timing import phase
from circuits.visit import (
    Analysis,
    VisitPlan,
    check_causal,
    library_versions,
    resolve_hooks,
    step_record,
    task_record,
)

INDEX_THROTTLE = 10.0  # rebuild index.h5 when a shard lands if the last rebuild is older than 10x its duration


# ---------------------------------------------------------------- helpers


def _check_writable(out: Path) -> None:
    try:
        (out / store.SHARD_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / store.SHARD_DIR / f".write-probe-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CircuitsError(f"--out {out}: cannot write the study there ({err.strerror or err})") from None


def _refuse_mismatch(out: Path, existing: dict[str, Any], field: str, ours: Any, theirs: Any, hint: str) -> None:
    if ours != theirs:
        raise CircuitsError(
            f"{out}: this study was made with another {field} ({_short(theirs)}, this sweep: {_short(ours)}); "
            f"{hint} or sweep into another --out"
        )


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(str(text).split())
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Landed:
    """The shards already in a study folder when a sweep starts (the index grows from these)."""

    done: set[int]  # complete shards among the selected steps
    layouts: dict[int, store.Layout]  # every complete shard's datasets
    tokens: dict[int, int]  # tokens seen at each complete shard's step
    damaged: dict[int, Path] = field(default_factory=dict)  # selected steps whose shard is not data


def _landed_shards(out: Path, selected: list[int]) -> Landed:
    found = store.scan_shards(out)
    layouts, tokens, problems = store.shard_layouts(found.items())
    return Landed(set(layouts) & set(selected), layouts, tokens, {s: found[s] for s in problems if s in selected})


def _move_aside(damaged: dict[int, Path]) -> None:
    """Damaged or unmarked shards are not data: keep them as ``.corrupt`` and redo their steps."""
    for step, path in damaged.items():
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        warnings.warn(f"{path}: not a complete shard; moved to {aside.name}, step {step} will be redone",
                      stacklevel=3)


# ---------------------------------------------------------------- the sweep


def builtin_analyses(method: str = "none", extra: Sequence[str] = ()) -> list[tuple[str, Analysis]]:
    """Head detectors and progress measures at every step; the circuit when a method is chosen;
    the ``extra`` ones named (``llc``: circuits.llc, off by default)."""
    from circuits.detectors import head_analysis
    from circuits.progress import progress_analysis

    chosen: list[tuple[str, Analysis]] = [("heads", head_analysis), ("progress", progress_analysis)]
    if method != "none":
        from circuits.discovery.analysis import circuit_analysis

        chosen.append(("circuit", circuit_analysis))
    if "llc" in extra:
        from circuits.llc import llc_analysis

        chosen.append(("llc", llc_analysis))
    return chosen


def sweep(
    manifest: Manifest | str | Path,
    task: str | Path | Task,
    out: str | Path,
    config: SweepConfig | None = None,
    *,
    analyses: Sequence[tuple[str, Analysis]] | None = None,
    executor: str | Executor | None = None,
    **settings: Any,
) -> store.Study:
    """Cache patterns, activations, outputs and analyses of every selected step into ``out``.

    ``config`` holds the sweep's settings; ``settings`` replace some of them by name
    (``sweep(run, "induction", out, steps="first:3", method="eap")``). Every setting is
    checked before anything is loaded or written. Resumable: complete shards are skipped; a
    study made with another manifest, task, prompts, hooks, dtype or ``keep_logits`` is
    refused (a manifest that only lists more steps than the study's is the same run, grown:
    the study takes the new one). Returns the opened Study. ``analyses=None`` runs the built-in
    ones (``builtin_analyses(method)``); pass ``()`` for none.

    ``task`` is a built-in task's name, a task file (``PATH.jsonl`` or ``PATH.csv``, read with
    the model's tokenizer: ``circuits.task_files``) or a ``Task``.

    Each pending step runs on the config's executor (``local``: this process; ``ray``: one Ray
    task per step; see docs/scaling.md), or on an executor object from ``circuits.executors``
    passed as ``executor``. Shards are the unit, so a sweep resumes whatever executor began it.

    ``follow=True`` (``circuits sweep --follow``): ``manifest`` is a local run still training;
    after the checkpoints present, new ones are visited as they land, until the run writes its
    completion marker or ``idle`` seconds pass without a new checkpoint (``_follow``).
    Once the run's final step is in the study, the measures that need the final checkpoint are
    computed (``circuits.run_end``).
    """
    runner = None if executor is None or isinstance(executor, str) else executor
    if isinstance(executor, str):
        settings["executor"] = executor
    config = (config or SweepConfig()).with_settings(**settings)
    if not config.follow:
        manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        selected = select_steps(config.steps, manifest.steps)
    if "llc" in config.extra_analyses:  # its settings checked now, and recorded whole in study.json
        import importlib.util

        from circuits.llc import parse_settings

        if importlib.util.find_spec("devinterp") is None:
            raise CircuitsError("--analyses llc needs devinterp, the optional llc extra: pip install 'circuits[llc]' "
                                "(devinterp==2.0.1)")
        llc = parse_settings(config.options.get("llc")).to_dict()
        config = config.with_settings(options={**config.options, "llc": llc})
    analyses = builtin_analyses(config.method, config.extra_analyses) if analyses is None else analyses
    _check_analysis_names(analyses)
    task_name_of(task)  # a task file that is not there: refused before anything is loaded

    out = Path(out)
    _check_writable(out)
    runners = _Runners(config, runner)
    try:
        if config.follow:
            _follow(manifest, task, out, config, tuple(analyses), runners)
        else:
            assert isinstance(manifest, Manifest)  # loaded above
            _sweep_steps(manifest, selected, task, out, config, tuple(analyses), runners,
                         trust_at=spread_steps(selected, config.trust_steps))
    finally:
        runners.close()
    from circuits.run_end import after_sweep

    ran = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)  # followed: as it ended
    after_sweep(out, ran, config.device)  # the run's final step visited: measures that need it (circuits.run_end)
    return store.open_study(out)


@dataclass
class _Runners:
    """The executor of a sweep: the caller's, or one made on first need (and closed at the end)."""

    config: SweepConfig
    given: Executor | None
    made: Executor | None = None

    @property
    def current(self) -> Executor | None:
        return self.given or self.made

    def get(self) -> Executor:
        """Started before any model is loaded: an unreachable cluster fails fast."""
        if self.current is None:
            self.made = make_executor(self.config)
        runner = self.current
        assert runner is not None
        return runner

    def close(self) -> None:
        if self.made is not None:
            self.made.close()
            self.made = None


def _sweep_steps(manifest: Manifest, selected: list[int], task: str | Path | Task, out: Path, config: SweepConfig,
                 analyses: tuple[tuple[str, Analysis], ...], runners: _Runners, trust_at: list[int]) -> None:
    """Land a shard for each of ``selected`` that has none yet (the study folder checked first)."""
    task_name = task_name_of(task)
    store.clean_stale_temporaries(out)
    existing = store.read_study_json(out)
    if existing is not None:
        if not _same_run_grown(manifest, existing["manifest"]):
            _refuse_mismatch(out, existing, "manifest", manifest.to_yaml(), existing["manifest"], "use the same manifest")
        made_by = existing["task"].get("options", {}).get("file") or existing["task"]["name"]  # a task file: its path
        _refuse_mismatch(out, existing, "task", task_name, existing["task"]["name"], f"use --task {made_by}")
        _refuse_mismatch(out, existing, "dtype", config.dtype, existing["dtype"], f"use --dtype {existing['dtype']}")
        # Shards of one study hold the same datasets: the index stacks them, readers expect them.
        _refuse_mismatch(out, existing, "--keep-logits", config.keep_logits, existing["keep_logits"],
                         "add --keep-logits" if existing["keep_logits"] else "leave out --keep-logits")
    landed = _landed_shards(out, selected)
    pending = [s for s in selected if s not in landed.done]
    runner = runners.get() if pending else runners.current
    prepared = _prepare(manifest, task, out, config, analyses, existing, (pending or selected)[0],
                        reuse_model=isinstance(runner, LocalExecutor), trust_at=trust_at, selected=selected)
    _move_aside(landed.damaged)
    if not (out / store.INDEX_FILE).exists() or not pending:
        store.write_index(out, landed.layouts, landed.tokens, prepared.index_provenance)
    if pending and runner is not None:
        _run(prepared, pending, landed, runner, progress=config.progress, total=len(selected),
             throttle=0.0 if config.follow else INDEX_THROTTLE)


def _same_run_grown(manifest: Manifest, stored: str) -> bool:
    """``manifest`` is the study's run, listing the same steps or more (a run still training).

    Every field but ``steps`` must be equal, and every step the study's manifest listed must
    still be there: a run folder whose checkpoints were replaced is another run.
    """
    import yaml

    ours = yaml.safe_load(manifest.to_yaml())
    try:
        theirs = yaml.safe_load(stored)
    except yaml.YAMLError:
        return False
    if not isinstance(theirs, dict) or not isinstance(theirs.get("steps"), list):
        return False
    same_fields = {k: v for k, v in ours.items() if k != "steps"} == {k: v for k, v in theirs.items() if k != "steps"}
    return same_fields and set(theirs["steps"]) <= set(ours["steps"])


def _follow(source: Manifest | str | Path, task: str | Path | Task, out: Path, config: SweepConfig,
            analyses: tuple[tuple[str, Analysis], ...], runners: _Runners) -> None:
    """Sweep a run still training: each poll re-reads its manifest and visits the steps whose
    checkpoints are complete and not yet visited (``circuits.follow``), until the run's
    completion marker is seen with nothing left to visit, or ``config.idle`` seconds pass with
    nothing new. Every round is an ordinary sweep of the steps landed so far, so a follower
    killed at any point resumes as a sweep does: complete shards are skipped.
    """
    from circuits.follow import IdleClock, run_finished, step_ready, trust_steps_so_far

    path, run_dir = _followed(source)
    clock = IdleClock(config.idle, config.poll)
    seen: set[int] = set()
    manifest: Manifest | None = None
    problem: CircuitsError | None = None
    waiting_said = False
    while True:
        finished = run_finished(run_dir)  # read before the manifest: then that manifest is the run's last
        try:
            manifest, problem = load_manifest(path), None
        except CircuitsError as err:  # not written yet (or rewritten by a writer that is not atomic)
            problem = err
        if manifest is not None and manifest.source != "local":
            raise CircuitsError(f"manifest {manifest.name}: --follow follows a local run still training; "
                                f"{manifest.name} is a {manifest.source} run (sweep it without --follow)")
        ready = [s for s in manifest.steps if s in seen or step_ready(manifest, s)] if manifest else []
        if manifest is not None and set(ready) - seen:
            _sweep_steps(manifest, ready, task, out, config, analyses, runners,
                         trust_at=trust_steps_so_far(ready, config.trust_steps, finished))
            seen |= set(ready)
            clock.restart()
            continue  # at once: more may have landed during the visits
        if finished or clock.expired():
            break
        if not seen and not waiting_said and config.progress:
            print(f"following {run_dir}: waiting for its first complete checkpoint", file=sys.stderr)
            waiting_said = True
        clock.wait()
    if not seen:
        why = "the run finished" if finished else f"--idle {config.idle:g} s passed"
        raise CircuitsError(f"{run_dir}: {why} with no complete checkpoint to follow"
                            + (f" ({problem})" if problem is not None else ""))
    never = [s for s in (manifest.steps if manifest else []) if s not in seen]
    if never:
        warnings.warn(f"{run_dir}: steps {', '.join(map(str, never))} are in the manifest but their checkpoints "
                      "never became complete; not visited (sweep again once they are)", stacklevel=3)


def _followed(source: Manifest | str | Path) -> tuple[Path, Path]:
    """(what to re-read the manifest from, the run folder where the completion marker lands)."""
    from circuits.follow import run_folder

    if isinstance(source, Manifest):
        run_dir = run_folder(source)
        return Path(str(source.origin)), run_dir
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        return path, path.parent
    return path, path


@dataclass
class _Prepared:
    """A sweep ready to run: what each step gets, and what the driver keeps for the index."""

    spec: StepSpec
    index_provenance: dict[str, Any]
    model: Any = None  # the first pending step's model, for an executor that can reuse it


def _prepare(manifest: Manifest, task: str | Path | Task, out: Path, config: SweepConfig,
             analyses: tuple[tuple[str, Analysis], ...], existing: dict[str, Any] | None, probe_step: int,
             reuse_model: bool, trust_at: list[int], selected: list[int]) -> _Prepared:
    """The task, the hooks and study.json, from the model of the first step to visit.

    ``trust_at``: the selected steps at which the circuit analysis checks its scores against
    exact patching (``options["trust_at"]``; not recorded in the shards' provenance: a resumed
    sweep may select other steps, see ``visit.SELECTION_OPTIONS``).

    Only the local executor reuses that model; for Ray it is loaded on the CPU, leaving GPUs
    to the workers.
    """
    from circuits.loading import load

    with phase("load"):
        model = load(manifest, probe_step, config.device if reuse_model else "cpu")
    task = resolve_task(task, model, config.n_examples, config.seed)
    check_causal(model, manifest)
    hook_names = resolve_hooks(model, config.hooks)
    record = study_record(manifest, task, model, config, hook_names) | {"steps": list(selected)}
    if existing is None:
        store.write_study_json(out, record)
    else:
        _refuse_mismatch(out, existing, "prompts (hash)", record["task"]["prompt_hash"], existing["task"]["prompt_hash"],
                         "use the same --n-examples and task seed")
        _refuse_mismatch(out, existing, "hooks", hook_names, existing["hooks"], "use the same --hooks")
        record = existing
        # every sweep's selection, so that a step selected once and without a shard reads as
        # missing, not as never asked for (the app names such steps)
        steps = sorted(set(existing.get("steps") or []) | set(selected))
        # a run still training lists more steps at each sweep (``_same_run_grown``): the study
        # describes the run as it is now, so that its reader loads the newest steps too
        grown = {"manifest": manifest.to_yaml()} if manifest.to_yaml() != existing["manifest"] else {}
        if steps != existing.get("steps") or grown:
            record = existing | {"steps": steps} | grown
            store.write_study_json(out, record)
    index_provenance = {k: v for k, v in record.items() if k != "task"}
    plan = VisitPlan(manifest=manifest, task=task, hooks=hook_names, dtype=config.dtype,
                     batch_size=config.batch_size, device=config.device, analyses=analyses,
                     options=config.analysis_options() | {"trust_at": trust_at}, keep_logits=config.keep_logits)
    spec = StepSpec(plan=plan, out=out, record=step_record(record), fault=faults.current())
    return _Prepared(spec, index_provenance, model if reuse_model else None)


def _run(prepared: _Prepared, pending: list[int], landed: Landed, runner: Executor, *, progress: bool,
         total: int, throttle: float = INDEX_THROTTLE) -> None:
    """Run the pending steps on ``runner``, rebuilding the index as their shards land.

    ``throttle`` 0 rebuilds it at every shard: a follower's shards land at the pace of training,
    and the index is then current after each step."""
    from tqdm.auto import tqdm

    out, layouts, tokens = prepared.spec.out, landed.layouts, landed.tokens
    bar = tqdm(total=total, initial=total - len(pending), unit="step", desc="sweep", disable=not progress,
               dynamic_ncols=True)
    index = {"stale": False, "at": 0.0, "took": 0.0}

    def rebuild_index() -> None:
        started = time.perf_counter()
        store.write_index(out, layouts, tokens, prepared.index_provenance)
        index.update(stale=False, at=time.perf_counter(), took=time.perf_counter() - started)

    def on_landed(result: StepResult) -> None:
        """A shard landed (on the writer thread locally, in this thread for Ray): rebuild the index.

        Its cost grows with the steps landed, so it is rebuilt at most once per ``throttle``
        times its last duration (<= ~10% of the time on tiny models), and always at the end.
        """
        layouts[result.step] = result.layout
        tokens[result.step] = result.tokens_seen
        index["stale"] = True
        if time.perf_counter() - index["at"] >= throttle * index["took"]:
            rebuild_index()
        metric = result.summary.metric_clean if result.summary is not None else float("nan")
        bar.set_postfix(step=result.step, metric=f"{metric:.3f}")
        bar.update(1)

    try:
        runner.run(prepared.spec, pending, on_landed, started=lambda step: bar.set_postfix(step=step),
                   model=prepared.model)
    finally:
        bar.close()
        if index["stale"]:  # also after a failure: the index shows every shard that landed
            rebuild_index()


def _check_analysis_names(analyses: Sequence[tuple[str, Analysis]]) -> None:
    for name, _ in analyses:
        if name in store.RESERVED or "/" in name or not name:
            raise CircuitsError(f"analysis name {name!r} is reserved or invalid (not {', '.join(store.RESERVED)}, no '/')")


def study_record(manifest: Manifest, task: Task, model, config: SweepConfig, hook_names: list[str]) -> dict[str, Any]:
    """What study.json says: the manifest, the task with its prompts, the model's shape, settings, versions."""
    cfg = model.cfg
    hook_filter = config.hooks if isinstance(config.hooks, str) or config.hooks is None else ",".join(config.hooks)
    return {
        "format": store.STUDY_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "manifest": manifest.to_yaml(),
        "manifest_name": manifest.name,
        "manifest_origin": manifest.origin,
        "task": task_record(task),
        "model": {"n_layers": int(cfg.n_layers), "n_heads": int(cfg.n_heads), "d_model": int(cfg.d_model),
                  "d_head": int(cfg.d_head), "d_vocab": int(cfg.d_vocab), "n_ctx": int(cfg.n_ctx),
                  "architecture": manifest.architecture, "graph": GraphSpec.from_model(model).to_dict()},
        "hook_filter": hook_filter or DEFAULT_HOOKS,
        "hooks": hook_names,
        "dtype": config.dtype,
        "keep_logits": config.keep_logits,
        "compression": store.COMPRESSION_NAME,
        "options": config.analysis_options(),
        "versions": library_versions(),
    }
