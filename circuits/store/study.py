"""Reading a study: ``Study`` serves patterns, activations, outputs and analysis results by step.

Only shards that ``store.index.open_shard`` accepts are ever read, each checked against the
study's record (``study.json``) when first seen; a damaged one becomes a ``problem`` of its
step rather than an error on opening the whole study.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from circuits.errors import CircuitsError
from circuits.graph import GraphSpec
from circuits.store.format import (
    OUTPUT_RUNS,
    PATTERNS,
    STUDY_FILE,
    cause,
    fill_value,
    triangle_size,
    unpack_patterns,
)
from circuits.store.index import Layout, datasets_of, open_shard, scan_shards
from circuits.store.record import read_study_json, task_from_record

# The run-end file: measures of every step that need the run's final checkpoint (the final key
# frequencies of modular addition), written once the run has ended by ``circuits.run_end`` and
# read here as ``progress/...`` keys beside the shards' own (docs/storage.md).
RUN_END_FILE = "run_end.h5"
RUN_END_FORMAT = "circuits-run-end/1"
RUN_END_KEYS = ("progress/restricted_loss", "progress/excluded_loss", "progress/key_freqs")


@dataclass(frozen=True)
class RunEnd:
    """What ``run_end.h5`` holds: per-step values at ``steps``, and what they were computed with."""

    steps: np.ndarray  # [n] int64, the steps computed
    values: dict[str, np.ndarray]  # "progress/restricted_loss" -> [n]; "progress/key_freqs" -> [n_key]
    provenance: dict[str, Any]  # final_step, key_freqs, n_key, manifest_name, written, versions

    def at(self, step: int) -> int | None:
        """Row of ``step`` in ``steps`` (None when not computed)."""
        hits = np.flatnonzero(self.steps == int(step))
        return int(hits[0]) if hits.size else None


def read_run_end(study: Path) -> RunEnd | None:
    """The study's run-end file, checked (None when there is none)."""
    path = Path(study) / RUN_END_FILE
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != RUN_END_FORMAT or not f.attrs.get("complete", False):
                found = f.attrs.get("format")
                raise CircuitsError(f"{path}: not a complete run-end file (format {found!r}, expected "
                                    f"{RUN_END_FORMAT!r}); rewrite it with `circuits finalize {study}`")
            provenance = json.loads(f.attrs["provenance"])
            steps = np.asarray(f["steps"][()], dtype=np.int64)
            values = {key: np.asarray(f[key][()]) for key in RUN_END_KEYS if key in f}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CircuitsError(f"{path}: damaged run-end file ({cause(err)}); rewrite it with "
                            f"`circuits finalize {study}`") from None
    per_step = [k for k in values if k != "progress/key_freqs"]
    if steps.ndim != 1 or any(values[k].shape != steps.shape for k in per_step):
        raise CircuitsError(f"{path}: damaged run-end file (its arrays do not match its {steps.size} steps); "
                            f"rewrite it with `circuits finalize {study}`")
    return RunEnd(steps, values, provenance)


if TYPE_CHECKING:  # they import torch, yaml or networkx: opening a study must not
    import networkx as nx

    from circuits.manifest import Manifest
    from circuits.tasks import LeanLogits, Task


def _max_open(wanted: int) -> int:
    """How many shards a Study keeps open: ``wanted``, or a quarter of the descriptor limit when lower."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return min(wanted, 64)
    return max(8, min(wanted, soft // 4)) if soft > 0 else wanted


def _signature(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime) of a file: a damaged shard is checked again only once it is replaced."""
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Study:
    """A study as arrays: patterns, activations, outputs and analysis results by step.

    Only complete shards are ever read; ``refresh()`` picks up shards landed since opening
    (a study still being written reads as far as it goes). Step-wise reads go to the shard
    files (kept open, least recently used closed first); ``index.h5`` serves h5py users.
    """

    # Shards kept open: enough for every step of a Pythia schedule (154), so reading a key
    # over all steps does not reopen files; bounded by the process's file-descriptor limit.
    MAX_OPEN = 512

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        record = read_study_json(self.path)
        if record is None:
            hint = " (the folder does not exist)" if not self.path.exists() else ""
            raise CircuitsError(f"{self.path}: not a study, no {STUDY_FILE}{hint}; make one with `circuits sweep`")
        self._record = record
        self._task: Task | None = None
        self._manifest: Manifest | None = None
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self._max_open = _max_open(self.MAX_OPEN)  # the file-descriptor limit, read once
        self._layouts: dict[int, Layout] = {}
        self._paths: dict[int, Path] = {}
        self._signatures: dict[int, tuple[int, int, int]] = {}
        self.problems: dict[int, str] = {}
        self.steps: list[int] = []
        self.run_end: RunEnd | None = None  # the run-end file, once the run has ended (circuits.run_end)
        self.run_end_problem: str | None = None  # why a run-end file there is not read
        self._run_end_signature = (0, 0, 0)
        self.refresh()

    # -- lifecycle
    def refresh(self) -> Study:
        """Rescan the shards folder: new complete shards become steps; damaged ones problems."""
        found = scan_shards(self.path)
        for step in list(self._layouts):
            if step not in found:
                self._forget(step)
        for step in list(self.problems):
            if step not in found:
                del self.problems[step]
        for step, path in found.items():
            signature = _signature(path)
            if step in self._layouts or (step in self.problems and self._signatures.get(step) == signature):
                continue  # landed shards never change; a damaged file is re-checked once replaced
            self._paths[step] = path
            self._signatures[step] = signature
            try:
                f = self._handle(step)
                layout = datasets_of(f)
                self._check_layout(step, layout)
                self._layouts[step] = layout
                self.problems.pop(step, None)
            except CircuitsError as err:
                self._forget(step)
                self.problems[step] = str(err)
        self.steps = sorted(self._layouts)
        self._refresh_run_end()
        return self

    def _refresh_run_end(self) -> None:
        """(Re)read ``run_end.h5`` when it appeared or was replaced; a damaged one is a problem, not data."""
        signature = _signature(self.path / RUN_END_FILE)
        if signature == self._run_end_signature:
            return
        self._run_end_signature = signature
        try:
            self.run_end, self.run_end_problem = read_run_end(self.path), None
        except CircuitsError as err:
            self.run_end, self.run_end_problem = None, str(err)

    def _from_run_end(self, key: str) -> bool:
        """Whether ``key`` is served by the run-end file: it holds it and no shard does."""
        return (self.run_end is not None and key in self.run_end.values
                and not any(key in layout for layout in self._layouts.values()))

    def _run_end_at(self, step: int, key: str) -> np.ndarray:
        assert self.run_end is not None  # checked by _from_run_end
        value = self.run_end.values[key]
        if key == "progress/key_freqs":
            return value  # one set for the whole run
        row = self.run_end.at(step)
        if row is None:
            raise CircuitsError(f"study {self.path}: step {step} holds no {key!r} (the run-end file lacks it; "
                                f"recompute with `circuits finalize {self.path}`)")
        return value[row]

    def _run_end_array(self, key: str) -> np.ndarray:
        assert self.run_end is not None  # checked by _from_run_end
        value = self.run_end.values[key]
        if key == "progress/key_freqs":
            return np.repeat(value[None], len(self.steps), axis=0)  # one set for the whole run
        out = np.full(len(self.steps), fill_value(value.dtype), dtype=value.dtype)
        for i, step in enumerate(self.steps):
            row = self.run_end.at(step)
            if row is not None:
                out[i] = value[row]
        return out

    def _check_layout(self, step: int, layout: Layout) -> None:
        """Refuse a shard whose datasets cannot be what this study stored."""
        path, task = self._paths[step], self._record["task"]
        n, t = task["n_examples"], task["seq_len"]
        patterns = (n, self.n_layers, self.n_heads, triangle_size(t))
        for name, (shape, dtype) in layout.items():
            kind = np.dtype(dtype).kind
            if kind not in "biuf":
                raise CircuitsError(f"{path}: damaged shard, {name!r} holds {dtype}, expected numbers")
            wrong = (name == PATTERNS and (shape != patterns or kind != "f")) or (
                name.startswith(("outputs/", "activations/")) and (shape[:1] != (n,) or kind != "f"))
            if wrong:
                want = f"float {patterns}" if name == PATTERNS else f"float [{n}, ...]"
                raise CircuitsError(f"{path}: damaged shard, {name!r} is {dtype} {shape}, expected {want}")

    def _forget(self, step: int) -> None:
        f = self._open.pop(step, None)
        if f is not None:
            f.close()
        self._layouts.pop(step, None)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> Study:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Study({str(self.path)!r}, {len(self.steps)} steps, task={self._record['task']['name']!r})"

    def _handle(self, step: int) -> h5py.File:
        f = self._open.get(step)
        if f is not None:
            self._open.move_to_end(step)
            return f
        f = open_shard(self._paths[step], self._record["task"]["prompt_hash"])
        self._open[step] = f
        while len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return f

    def _shard(self, step: int) -> h5py.File:
        step = int(step)
        if step in self.problems:
            raise CircuitsError(self.problems[step])
        if step not in self._layouts:
            span = f"{len(self.steps)} steps from {self.steps[0]} to {self.steps[-1]}" if self.steps else "no complete step yet"
            raise CircuitsError(f"study {self.path}: step {step} is not in the study ({span})")
        return self._handle(step)

    def _read(self, step: int, name: str, index: Any = ()) -> np.ndarray:
        f = self._shard(step)
        if name not in f:
            raise CircuitsError(f"study {self.path}: step {step} holds no {name!r}")
        try:
            return f[name][index]
        except (OSError, ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
            raise CircuitsError(f"{self._paths[step]}: corrupted shard, cannot read {name!r} ({cause(err)})") from None

    # -- description
    @property
    def provenance(self) -> dict[str, Any]:
        """What made the study (manifest, task and prompt hash, versions, hooks, dtype, options)."""
        return {k: v for k, v in self._record.items() if k != "task"} | {
            "task": {k: v for k, v in self._record["task"].items() if k != "arrays"}
        }

    def shard_provenance(self, step: int) -> dict[str, Any]:
        return json.loads(self._shard(step).attrs["provenance"])

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            import yaml

            from circuits.manifest import parse_manifest

            origin = self._record.get("manifest_origin") or f"{self.path}/{STUDY_FILE}#manifest"
            try:
                data = yaml.safe_load(self._record["manifest"])
            except yaml.YAMLError:
                raise CircuitsError(f"{self.path / STUDY_FILE}: damaged study description, field 'manifest' "
                                    "is not valid YAML") from None
            self._manifest = parse_manifest(data, origin=str(origin))
        return self._manifest

    @property
    def task(self) -> Task:
        if self._task is None:
            try:
                task = task_from_record(self._record["task"])
                if task.prompt_hash() != self._record["task"]["prompt_hash"]:
                    raise CircuitsError("its prompts do not match their recorded hash")
                self._task = task
            except CircuitsError as err:
                raise CircuitsError(f"{self.path / STUDY_FILE}: damaged study description ({err})") from None
            except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RuntimeError) as err:
                raise CircuitsError(f"{self.path / STUDY_FILE}: damaged study description, field 'task' does "
                                    f"not describe a task ({cause(err)})") from None
        return self._task

    @property
    def n_layers(self) -> int:
        return int(self._record["model"]["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self._record["model"]["n_heads"])

    @property
    def graph_spec(self) -> GraphSpec:
        """The graph of the model the sweep analysed (``model.graph`` of study.json)."""
        return GraphSpec.from_dict(self._record["model"]["graph"], f"{self.path / STUDY_FILE}: field 'model.graph'")

    @property
    def n_examples(self) -> int:
        return int(self._record["task"]["n_examples"])

    @property
    def seq_len(self) -> int:
        return int(self._record["task"]["seq_len"])

    @property
    def hooks(self) -> list[str]:
        return list(self._record["hooks"])

    @property
    def tokens_seen(self) -> np.ndarray:
        return np.asarray([int(self._shard(s).attrs["tokens_seen"]) for s in self.steps], dtype=np.int64)

    def tokens(self, example: int, corrupted: bool = False) -> np.ndarray:
        """Token ids of one prompt (clean, or its corrupted twin)."""
        self._check_index("example", example, self.n_examples)
        prompts = self.task.corrupted if corrupted else self.task.clean  # checked against the prompt hash
        return prompts[int(example)].numpy().astype(np.int64)

    # -- step-wise reads
    def _check_index(self, what: str, value: int, size: int) -> None:
        if not isinstance(value, int | np.integer) or not 0 <= int(value) < size:
            raise CircuitsError(f"study {self.path}: {what} {value!r} does not exist (valid: 0..{size - 1})")

    def pattern(self, step: int, layer: int, head: int, example: int) -> np.ndarray:
        """Attention pattern [query, key] (float32) of one head on one clean prompt at one step."""
        self._check_index("layer", layer, self.n_layers)
        self._check_index("head", head, self.n_heads)
        self._check_index("example", example, self.n_examples)
        return unpack_patterns(self._read(step, PATTERNS, (int(example), int(layer), int(head))).astype(np.float32))

    def activation(self, step: int, hook: str, example: int | None = None) -> np.ndarray:
        """A cached activation of the clean prompts ([example, ...] as TL shapes it), float32."""
        if hook not in self.hooks:
            shown = ", ".join(self.hooks[:6]) or "none"
            raise CircuitsError(f"study {self.path}: hook {hook!r} was not cached (cached: {shown})")
        index: Any = ()
        if example is not None:
            self._check_index("example", example, self.n_examples)
            index = int(example)
        return self._read(step, f"activations/{hook}", index).astype(np.float32)

    def array_at(self, step: int, key: str) -> np.ndarray:
        """One stored array at one step (``"heads/induction"``, ``"outputs/metric_clean"``...)."""
        key = key.strip("/")
        if self._from_run_end(key):
            self._shard(step)  # a step of the study, or the error that says it is not
            return self._run_end_at(int(step), key)
        return self._read(step, key)

    def has(self, key: str) -> bool:
        key = key.strip("/")
        return any(key in layout for layout in self._layouts.values()) or self._from_run_end(key)

    def keys(self, prefix: str | None = None) -> list[str]:
        """Every stored key (datasets, and the run-end file's), optionally only those under ``prefix/``."""
        found = sorted({k for layout in self._layouts.values() for k in layout}
                       | set(self.run_end.values if self.run_end is not None and self.steps else ()))
        if prefix:
            found = [k for k in found if k.startswith(prefix.strip("/") + "/")]
        return found

    def array(self, key: str) -> np.ndarray:
        """``key`` stacked over ``steps``: [n_steps, ...]; NaN (False, -1) where a step lacks it."""
        key = key.strip("/")
        if self._from_run_end(key):
            return self._run_end_array(key)
        specs = [self._layouts[s][key] for s in self.steps if key in self._layouts[s]]
        if not specs:
            raise CircuitsError(f"study {self.path}: no step holds {key!r} (stored: {', '.join(self.keys()[:8])})")
        shape, dtype = specs[-1]
        out = np.full((len(self.steps), *shape), fill_value(np.dtype(dtype)), dtype=dtype)
        for i, step in enumerate(self.steps):
            if self._layouts[step].get(key, (None,))[0] == shape:
                out[i] = self._read(step, key)
        return out

    def _mean(self, key: str, per_example: bool) -> np.ndarray:
        values = self.array(f"outputs/{key}").astype(np.float64)
        return values if per_example else values.mean(axis=tuple(range(1, values.ndim)))

    def metric(self, per_example: bool = False) -> np.ndarray:
        """Task metric on the clean prompts over steps (mean over examples unless per_example)."""
        return self._mean("metric_clean", per_example)

    def metric_corrupted(self, per_example: bool = False) -> np.ndarray:
        return self._mean("metric_corrupted", per_example)

    def loss(self, per_example: bool = False) -> np.ndarray:
        """Cross-entropy of the correct answers at the answer positions (clean prompts), over steps."""
        return self._mean("loss_clean", per_example)

    def loss_corrupted(self, per_example: bool = False) -> np.ndarray:
        return self._mean("loss_corrupted", per_example)

    def lean_logits(self, step: int, run: str = "clean") -> LeanLogits:
        """The lean answer logits of one run at one step, as stored (``tasks.lean_metric`` and
        ``tasks.lean_loss`` recompute the metric and loss from them)."""
        import torch

        from circuits.tasks import LeanLogits

        if run not in OUTPUT_RUNS:
            raise CircuitsError(f"study {self.path}: run {run!r} does not exist (valid: {', '.join(OUTPUT_RUNS)})")
        f = self._shard(step)

        def read(key: str) -> torch.Tensor | None:
            name = f"outputs/{key}_{run}"
            return torch.from_numpy(self._read(step, name)) if name in f else None

        correct, lse, mean_logit = (read(k) for k in ("correct_logits", "lse", "mean_logit"))
        if correct is None or lse is None or mean_logit is None:
            raise CircuitsError(f"study {self.path}: step {step} holds no lean answer logits ({run})")
        return LeanLogits(correct=correct, lse=lse, mean_logit=mean_logit, wrong=read("wrong_logits"))

    def circuit(self, step: int, **kwargs: Any) -> nx.DiGraph:
        """The circuit found at ``step`` as a networkx DiGraph (see circuits.graph)."""
        from circuits.graph import circuit_digraph

        return circuit_digraph(self, step, **kwargs)


def open_study(path: str | Path) -> Study:
    """Open a study folder made by ``circuits sweep`` (readable while a sweep still writes it)."""
    return Study(path)

