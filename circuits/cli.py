"""The ``circuits`` command line. Heavy libraries load inside each command, so ``--help`` is fast.

Every user error is a ``CircuitsError``: printed as one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from circuits.config import FOLLOW_IDLE, FOLLOW_POLL
from circuits.errors import CircuitsError

app = typer.Typer(
    name="circuits",
    help="Mechanistic interpretability across training checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="induction | modular-addition")],
    out: Annotated[Path, typer.Option(help="Empty folder for the run's checkpoints")],
    steps: Annotated[int | None, typer.Option(help="Training steps (epochs for full-batch runs)")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (data and init)")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Linear part of the log-then-linear schedule")] = None,
    p: Annotated[int | None, typer.Option(help="modular-addition: the modulus")] = None,
    train_frac: Annotated[float | None, typer.Option(help="modular-addition: share of pairs for training")] = None,
    freeze_biases: Annotated[bool | None, typer.Option("--freeze-biases/--train-biases", help="modular-addition: keep "
                             "every bias at zero, untrained (Nanda et al. 2023; the default), or train them")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Train a built-in run on a dense checkpoint schedule (safetensors, one folder per step)."""
    from circuits.config import check_device
    from circuits.recipes import recipe_module, train_recipe

    options: dict[str, Any] = {"steps": steps, "seed": seed, "checkpoint_every": checkpoint_every}
    if recipe == "modular-addition":
        options |= {"p": p, "train_frac": train_frac, "freeze_biases": freeze_biases}
    elif p is not None or train_frac is not None or freeze_biases is not None:
        raise CircuitsError(f"--p, --train-frac and --freeze-biases apply to modular-addition, not to {recipe!r}")
    recipe_module(recipe)  # unknown recipe: one clear line before anything touches disk
    check_device(device)
    manifest = train_recipe(recipe, out, device=device, **options)
    typer.echo(f"trained {manifest.name}: {len(manifest.steps)} checkpoints in {out}")
    print_history(out)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's run and study")] = Path("runs/demo"),
    no_app: Annotated[bool, typer.Option("--no-app", help="Do not start the app at the end")] = False,
    method: Annotated[str, typer.Option(help="Circuit discovery method for the sweep")] = "eap-ig",
    steps: Annotated[str, typer.Option(help="Steps of the run to study (selection language)")] = "all",
    port: Annotated[int, typer.Option(help="Port of the app")] = 8501,
    llc: Annotated[bool, typer.Option("--llc", help="Also estimate the local learning coefficient at every step "
                                      "(devinterp's SGLD; ~10 s a checkpoint on 2 cores: docs/tracking.md)")] = False,
) -> None:
    """The whole job on the built-in induction run: train, sweep with circuits, track, app."""
    from circuits.app_launcher import launch
    from circuits.recipes import train_recipe
    from circuits.sweep import sweep as run_sweep
    from circuits.tracking import summary_text, track

    run_dir, study_dir = out / "induction-2l", out / "induction-study"
    typer.echo(f"[1/4] training the induction run into {run_dir} (resumed if already there)")
    manifest = train_recipe("induction", run_dir)
    print_history(run_dir)
    typer.echo(f"[2/4] sweeping {len(manifest.steps)} checkpoints into {study_dir}: patterns, "
               f"activations, head detectors, {method} circuits" + (", the LLC" if llc else ""))
    study = run_sweep(manifest, "induction", study_dir, steps=steps, method=method,
                      extra_analyses=("llc",) if llc else ())
    typer.echo("[3/4] how the circuit formed")
    typer.echo(summary_text(track(study)))
    if no_app:
        typer.echo(f"[4/4] skipped the app; start it with: circuits app {study_dir}")
        return
    typer.echo(f"[4/4] the app: http://127.0.0.1:{port}")
    raise typer.Exit(launch(study_dir, port=port))


@app.command()
def sweep(
    manifest: Annotated[str, typer.Argument(help="Manifest YAML, run folder, or built-in manifest name")],
    task: Annotated[str, typer.Option(help="Task name (induction, modular-addition, ioi, greater-than) or a task file: PATH.jsonl or PATH.csv (EAP-IG's IOI and greater-than CSVs read as they are; docs/discovery.md)")],
    out: Annotated[Path, typer.Option(help="Study folder (created; an existing study is resumed)")],
    steps: Annotated[str | None, typer.Option(help="Step selection: all, every:K, log:N, range:A-B[:K], first:N, last:N, or 0,100,200")] = None,
    hooks: Annotated[str | None, typer.Option(help="Activations to cache: names or globs, comma-separated, or 'none' [default: blocks.*.hook_resid_post,blocks.*.attn.hook_z]")] = None,
    dtype: Annotated[str, typer.Option(help="float16 or float32 (patterns and activations)")] = "float16",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (bounds memory)")] = 32,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    n_examples: Annotated[int | None, typer.Option(help="Number of prompts (default: the task's)")] = None,
    method: Annotated[str, typer.Option(help="Circuit discovery: none, eap, eap-ig or patching")] = "none",
    ig_steps: Annotated[int, typer.Option(help="eap-ig: interpolation steps m (Tigges et al. use 30)")] = 5,
    target: Annotated[float, typer.Option(help="Faithfulness the selected circuit must reach")] = 0.8,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples of the prompts per step (circuit uncertainty, the stable circuit)")] = 20,
    stable_share: Annotated[float, typer.Option(help="Share of resamples an edge must be in to belong to the stable circuit")] = 0.8,
    trust_steps: Annotated[int, typer.Option(help="Check the method's edge scores against exact patching at this many steps (spread, the last included; 0: off)")] = 5,
    trust_max_edges: Annotated[int, typer.Option(help="... only where the graph has at most this many edges (exact patching costs ~1 forward per edge)")] = 2000,
    node_effects: Annotated[str, typer.Option(help="Each node's contribution: exact (one ablated forward per writer), attribution (sum of its edge scores) or auto (exact up to 64 writers)")] = "auto",
    max_memory: Annotated[str | None, typer.Option(help="Working memory of circuit discovery per step, e.g. 2GB or 800MB; computations are chunked to fit, with the same results [default: min(2 GiB, half the available memory)]")] = None,
    keep_logits: Annotated[bool, typer.Option("--keep-logits", help="Also store full-vocabulary logits at the answer positions (to recompute kl or a user metric later; every metric is computed in the sweep either way); default: the correct and wrong tokens' logits, log-sum-exp and mean logit only")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar")] = False,
    executor: Annotated[str, typer.Option(help="Where steps run: local (this process) or ray (one task per step; docs/scaling.md)")] = "local",
    workers: Annotated[int | None, typer.Option(help="ray: steps in flight at once (default: the cluster's CPUs, or GPUs with --device cuda)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="ray: join this cluster (auto, host:6379, ray://host:10001) instead of starting a local instance")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="A run still training: after the steps present, visit new checkpoints as they land, until the run writes training.done or --idle seconds pass without one (docs/follow.md)")] = False,
    idle: Annotated[float, typer.Option(help="--follow: stop after this many seconds without a new checkpoint")] = FOLLOW_IDLE,
    poll: Annotated[float, typer.Option(help="--follow: look for new checkpoints every this many seconds")] = FOLLOW_POLL,
    analyses: Annotated[str | None, typer.Option(help="Extra analyses, off by default: llc (the local learning coefficient, devinterp's SGLD; docs/tracking.md)")] = None,
    llc: Annotated[str | None, typer.Option(help="llc settings as KEY=VALUE,...: lr, localization, nbeta, chains, draws, burnin, batch_size, n_data, seed, data (auto, training or task); calibrate with `circuits llc-calibrate`")] = None,
) -> None:
    """Cache patterns, activations, logits, loss, metric, head scores and (with --method) the circuit of every selected step."""
    from circuits.config import SweepConfig
    from circuits.sweep import sweep as run_sweep

    config = SweepConfig(steps=steps, hooks=hooks, dtype=dtype, batch_size=batch_size, device=device,
                         n_examples=n_examples, method=method, ig_steps=ig_steps, target=target,
                         resamples=resamples, stable_share=stable_share, trust_steps=trust_steps,
                         trust_max_edges=trust_max_edges, node_effects=node_effects, max_memory=max_memory,
                         keep_logits=keep_logits, progress=not no_progress, executor=executor, workers=workers, ray_address=ray_address,
                         follow=follow, idle=idle, poll=poll,
                         extra_analyses=analyses or (), options={"llc": llc} if llc is not None else {})
    if llc is not None and "llc" not in config.extra_analyses:
        raise CircuitsError("--llc sets the llc analysis's settings: add --analyses llc")
    study = run_sweep(manifest, task, out, config)
    typer.echo(f"study {out}: {len(study.steps)} steps, {study.n_examples} prompts of {study.seq_len} tokens")


@app.command("import-weights")
def import_weights(
    weights: Annotated[Path, typer.Argument(help="Weights: .safetensors, or .pt/.pth/.bin (read with torch.load(weights_only=True) only)")],
    config: Annotated[Path, typer.Option(help="The model's config JSON: a TransformerLens config, or a Hugging Face config.json (with model_type)")],
    step: Annotated[int, typer.Option(help="Training step of these weights")],
    out: Annotated[Path, typer.Option(help="Run folder (created; an existing one of ours takes the new step)")],
    tokens_per_step: Annotated[int | None, typer.Option(help="Tokens each training step saw (batch x sequence length); needed for a new run")] = None,
    name: Annotated[str | None, typer.Option(help="Run name in the manifest (default: the folder's name)")] = None,
) -> None:
    """Write given weights as one checkpoint of a run folder (manifest.yaml + step folder, safetensors), ready to sweep."""
    from circuits.runs import import_weights as write_step

    manifest = write_step(weights, config, out, step=step, tokens_per_step=tokens_per_step, name=name)
    typer.echo(f"run {out}: step {step} written; {len(manifest.steps)} steps ({manifest.architecture})")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark to run: extract, extract-70m, discover, app, scaling, "
                                            "formation, pythia, llc, or all (every one but pythia and llc, side by side)")] = "all",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON only")] = False,
    manifest: Annotated[str | None, typer.Option(help="extract: benchmark this run's checkpoint instead of the built-in model")] = None,
    step: Annotated[int | None, typer.Option(help="extract: step of --manifest (default: its last)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    run: Annotated[str | None, typer.Option(help="scaling, formation, llc: sweep this trained induction run instead of training one")] = None,
    study: Annotated[str | None, typer.Option(help="app: measure in the browser on this study (e.g. the demo's) "
                                                   "instead of a synthetic one of the demo's shape")] = None,
    size: Annotated[str | None, typer.Option(help="pythia: the shape, 160m (default), 410m or 1b")] = None,
    train_steps: Annotated[int | None, typer.Option(help="pythia: training steps of the cached checkpoint")] = None,
    eap_ig_python: Annotated[str | None, typer.Option(help="pythia: a Python with TransformerLens 2.x and the EAP-IG "
                                                           "library, to compare with on the same weights")] = None,
    max_memory: Annotated[str | None, typer.Option(help="pythia: the sweep's --max-memory for the step")] = None,
) -> None:
    """Run a named benchmark, or all of them; print their figures against their goals (a table, or JSON)."""
    import json

    from circuits.bench import print_result, run_benchmark
    from circuits.config import check_device

    check_device(device)
    options: dict[str, Any] = {"device": device}
    if manifest is not None or step is not None:
        if name not in ("extract", "all"):
            raise CircuitsError(f"--manifest and --step apply to the extract benchmark, not to {name!r}")
        options |= {"manifest": manifest, "step": step}
    if run is not None:
        if name not in ("scaling", "formation", "llc", "all"):
            raise CircuitsError(f"--run applies to the scaling, formation and llc benchmarks, not to {name!r}")
        options |= {"run": run}
    if study is not None:
        if name not in ("app", "all"):
            raise CircuitsError(f"--study applies to the app benchmark, not to {name!r}")
        options |= {"study": study}
    pythia = {"size": size, "train_steps": train_steps, "eap_ig_python": eap_ig_python, "max_memory": max_memory}
    if any(v is not None for v in pythia.values()):
        if name not in ("pythia", "all"):
            given = ", ".join(f"--{k.replace('_', '-')}" for k, v in pythia.items() if v is not None)
            raise CircuitsError(f"{given} apply to the pythia benchmark, not to {name!r}")
        options |= {k: v for k, v in pythia.items() if v is not None}
    result = run_benchmark(name, **options)
    if as_json:
        typer.echo(json.dumps(result, indent=1, default=str))
    else:
        print_result(result)
        typer.echo(json.dumps({k: v["value"] for k, v in result["figures"].items()}))


@app.command()
def summary(
    study: Annotated[Path, typer.Argument(help="Study folder (made by `circuits sweep`)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the tracking as JSON (schema: docs/tracking.md)")] = False,
    figures: Annotated[Path | None, typer.Option(help="Also write HTML (and PNG) figures into this folder")] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="With --figures: HTML only, no PNG")] = False,
    gap_z: Annotated[float, typer.Option(help="A step has a circuit only when its clean-corrupted gap is this many standard errors from 0")] = 3.0,
    reproducible: Annotated[float, typer.Option(help="... and its resamples' circuits have at least this mean Jaccard against it")] = 0.6,
    gap_floor: Annotated[float, typer.Option(help="... and its gap is at least this share of the study's largest gap")] = 0.0,
) -> None:
    """How the circuit forms over training: phase changes, emergence order, stability."""
    import json

    from circuits.store import open_study
    from circuits.tracking import summary_text, track

    tracking = track(open_study(study), gap_z=gap_z, reproducible=reproducible, gap_floor=gap_floor)
    typer.echo(json.dumps(tracking.to_dict(), indent=1) if as_json else summary_text(tracking))
    if figures is not None:
        from circuits.figures import write_figures

        written = write_figures(tracking, None, figures, png=not no_png)
        for note in written["notes"]:
            typer.echo(f"note: {note}", err=True)
        typer.echo(f"figures: {len(written['html'])} HTML, {len(written['png'])} PNG in {figures}", err=as_json)


@app.command("manifest")
def manifest_command(
    folder: Annotated[Path | None, typer.Argument(help="Run folder holding the checkpoints (step{N}/, checkpoint-{N}/, NAME_{N}.safetensors, ...)")] = None,
    pattern: Annotated[str | None, typer.Option(help="Checkpoint names with a {step} placeholder, folders or files, e.g. 'ckpt-{step}'")] = None,
    name: Annotated[str | None, typer.Option(help="Run name [default: the folder's, or the repository's]")] = None,
    tokens_per_step: Annotated[int | None, typer.Option(help="Tokens per optimizer step, when the run's files do not say")] = None,
    out: Annotated[Path | None, typer.Option(help="Manifest file to write [default: FOLDER/manifest.yaml; with --hub, REPO-NAME.yaml]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing manifest file")] = False,
    hub: Annotated[str | None, typer.Option(help="A Hub repository (owner/name) instead of a folder")] = None,
    revisions: Annotated[Path | None, typer.Option(help="--hub: a file of revision names, one a line (offline; default: the repository's branches)")] = None,
    architecture: Annotated[str | None, typer.Option(help="--hub: the model's architecture, e.g. GPTNeoXForCausalLM")] = None,
) -> None:
    """Write a manifest for a run folder (its checkpoint layout detected) or a Hub repository."""
    import os

    if (folder is None) == (hub is None):
        raise CircuitsError("give a run FOLDER or --hub REPO (one of the two)")
    if hub is None:
        from circuits.folder_manifest import manifest_from_folder

        assert folder is not None  # checked above
        if revisions is not None or architecture is not None:
            raise CircuitsError("--revisions and --architecture apply to --hub, not to a run folder")
        target = out if out is not None else folder / "manifest.yaml"
        _refuse_overwrite(target, force)
        rel = Path(os.path.relpath(folder.resolve(), target.resolve().parent))
        if ".." in rel.parts:
            raise CircuitsError(f"--out {target}: must lie in {folder} or a folder above it (a manifest names its "
                                "checkpoints by a path inside its own folder)")
        manifest = manifest_from_folder(folder, path=rel.as_posix(), pattern=pattern, name=name,
                                        tokens_per_step=tokens_per_step)
    else:
        import importlib

        # Imported by name: circuits.hub_revisions (the Hub's branch names) is a module of its own.
        try:
            manifest_from_hub = importlib.import_module("circuits.hub_revisions").manifest_from_hub
        except ModuleNotFoundError as err:
            if err.name != "circuits.hub_revisions":
                raise
            raise CircuitsError("--hub: this installation has no circuits.hub_revisions (Hub manifests)") from None
        if pattern is not None or tokens_per_step is not None:
            raise CircuitsError("--pattern and --tokens-per-step apply to a run folder, not to --hub")
        target = out if out is not None else Path(f"{hub.rsplit('/', 1)[-1]}.yaml")
        _refuse_overwrite(target, force)
        names = _revision_list(revisions) if revisions is not None else None
        manifest = manifest_from_hub(hub, names, name=name, architecture=architecture)
    from circuits.checkpoint import write_text_atomically

    write_text_atomically(target, manifest.to_yaml())
    from circuits.manifest import load_manifest

    written = load_manifest(target)  # read back as sweep will: the paths resolve from the file's folder
    layout = written.local.layout if written.local is not None else "hub"
    typer.echo(f"wrote {target}: {written.name}, {len(written.steps)} checkpoints (steps {written.steps[0]} to "
               f"{written.steps[-1]}, layout {layout})")


def _refuse_overwrite(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise CircuitsError(f"{target}: exists; pass --force to replace it, or --out for another file")
    if target.is_dir():
        raise CircuitsError(f"--out {target}: is a folder; expected a manifest file path (e.g. {target / 'manifest.yaml'})")


def _revision_list(path: Path) -> list[str]:
    """Revision names from a text file: one a line, blank lines and '#' comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CircuitsError(f"--revisions {path}: cannot read ({getattr(err, 'strerror', None) or 'not text'})") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [n for n in names if n]
    if not names:
        raise CircuitsError(f"--revisions {path}: no revision names (expected one a line)")
    return names




@app.command()
def finalize(
    study: Annotated[Path, typer.Argument(help="Study folder (made by `circuits sweep`) of a run that has ended")],
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Compute the measures that need the run's final checkpoint (modular addition: restricted and excluded loss)."""
    from circuits.config import check_device
    from circuits.run_end import finalize as run_finalize

    check_device(device)
    done = run_finalize(study, device)
    if done is None:
        typer.echo(f"study {study}: nothing is computed at run end for this run")
        return
    prov = done.provenance
    typer.echo(f"study {study}: run-end measures of {done.steps.size} steps with the key frequencies "
               f"{', '.join(map(str, prov['key_freqs']))} of the final step {prov['final_step']}")


def print_history(run_dir: Path) -> None:
    """A table of a trained run's checkpoints and their evaluation metrics."""
    from rich.console import Console
    from rich.table import Table

    from circuits.recipes.common import read_history

    history = read_history(run_dir)
    columns = [k for k in history[0] if k != "elapsed_s"]
    table = Table(title=f"checkpoints of {run_dir}")
    for column in columns:
        table.add_column(column, justify="right")
    for row in history:
        table.add_row(*(str(row[c]) if c == "step" else f"{row[c]:.4f}" for c in columns))
    Console().print(table)


@app.command("llc-calibrate")
def llc_calibrate(
    manifest: Annotated[str, typer.Argument(help="Manifest YAML, run folder, or built-in manifest name")],
    step: Annotated[int, typer.Option(help="The checkpoint to calibrate on")],
    task: Annotated[str, typer.Option(help="Task (its loss, unless the run is a built-in induction run: its training data)")] = "induction",
    out: Annotated[Path | None, typer.Option(help="Folder for traces.html (+ .png) and calibration.json")] = None,
    lrs: Annotated[str, typer.Option(help="SGLD step sizes to try, comma-separated")] = "1e-4,3e-4,1e-3",
    localizations: Annotated[str, typer.Option(help="Localization strengths (gamma) to try, comma-separated")] = "100,300,1000",
    llc: Annotated[str | None, typer.Option(help="The other settings, KEY=VALUE,... (as `circuits sweep --llc`)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Sweep the LLC sampler's step size x localization on one checkpoint: a table with the rule used, and the traces."""
    from circuits.config import check_device
    from circuits.llc import parse_settings
    from circuits.llc_calibrate import calibrate, table_text, write
    from circuits.manifest import load_manifest

    check_device(device)
    grid = (_floats("--lrs", lrs), _floats("--localizations", localizations))
    base = parse_settings(llc)
    if out is not None and any((out / name).exists() for name in ("traces.html", "calibration.json")):
        raise CircuitsError(f"--out {out}: already holds a calibration (traces.html or calibration.json); "
                            "choose another folder")
    loaded = load_manifest(manifest)
    loaded.require_step(step)
    cal = calibrate(loaded, step, task, base, *grid, device=device)
    typer.echo(table_text(cal))
    if out is not None:
        typer.echo(f"wrote {', '.join(write(cal, out))}")


def _floats(option: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not v >= 0 for v in values):
        raise CircuitsError(f"{option} {text!r}: expected numbers >= 0 separated by commas, e.g. 1e-4,3e-4,1e-3")
    return values


@app.command("app")
def app_command(
    study: Annotated[Path, typer.Argument(help="Study folder (made by `circuits sweep`)")],
    port: Annotated[int, typer.Option(help="Port to serve on")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind; other than 127.0.0.1 only when asked")] = "127.0.0.1",
) -> None:
    """Start the Streamlit app on a study (circuit graphs evolving step by step)."""
    from circuits.app_launcher import launch

    raise typer.Exit(launch(study, port=port, address=address))


def main() -> None:
    try:
        app()
    except CircuitsError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
