"""The run-end pass: measures of every step that need the run's final checkpoint.

A step's visit reads only its own checkpoint, so that a study of a run still training holds
the same numbers at each step as a study made after the run ended. Some measures, though,
compare a step with the end of training: for modular addition, restricted and excluded loss
(Nanda et al. 2023) use the key Fourier frequencies of the run's *final* checkpoint, and they
need each step's logits. They are computed here, once the final checkpoint exists:

- by the sweep, after it has visited the run's final step (``after_sweep``);
- by ``circuits finalize STUDY`` for a study made while the run was still training.

``finalize`` loads the final checkpoint (its top ``n_key`` embedding frequencies are the key
set), then each step of the study once more (modular addition is tiny), and writes
``STUDY/run_end.h5`` atomically: ``steps``, ``progress/restricted_loss``,
``progress/excluded_loss``, ``progress/key_freqs`` and its provenance (final step, key
frequencies, ``n_key``). ``Study`` serves them as ``progress/...`` keys beside the shards'.
Steps already in an up-to-date run-end file (same final step and key set) are not recomputed.
``key_share`` needs no checkpoint: ``circuits.tracking`` computes it from the stored
``progress/embed_freq_norm`` and these key frequencies.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np

from circuits.errors import CircuitsError
from circuits.manifest import Manifest
from circuits.store.study import RUN_END_FILE, RUN_END_FORMAT, RunEnd, Study, open_study


@dataclass(frozen=True)
class FinalKeys:
    """The key frequencies of a run: the top ``n_key`` of its final checkpoint's embedding."""

    final_step: int
    key_freqs: np.ndarray  # [n_key] int64, 1-based, increasing
    n_key: int


def needs_run_end(study: Study) -> bool:
    """Whether the study has measures computed at run end: modular addition without given keys."""
    local = study.manifest.local
    options = study.provenance.get("options") or {}
    return (local is not None and local.recipe == "modular-addition" and "key_freqs" not in options
            and study.has("progress/embed_freq_norm"))


def final_keys(study: Study, device: str = "cpu") -> FinalKeys:
    """Load the run's final checkpoint and take its top frequencies (refused while it is missing)."""
    from circuits.loading import checkpoint_dir, load
    from circuits.progress import model_freq_norms, n_key_freqs, top_freqs

    manifest = study.manifest
    final = int(manifest.steps[-1])
    if manifest.source == "local":
        try:
            checkpoint_dir(manifest, final)
        except CircuitsError:
            raise CircuitsError(f"study {study.path}: the run {manifest.name} has not ended, its final step {final} has "
                                f"no checkpoint yet; run `circuits finalize {study.path}` once it has") from None
    local = manifest.local
    assert local is not None  # needs_run_end checked it
    p = int(local.options["p"])
    n_key = n_key_freqs(study.provenance.get("options") or {}, p)
    norms = model_freq_norms(load(manifest, final, device), p)
    return FinalKeys(final, top_freqs(norms, n_key).astype(np.int64), n_key)


def _reusable(existing: RunEnd | None, keys: FinalKeys) -> dict[int, tuple[float, float]]:
    """Values of an existing run-end file made with the same final step and keys, by step."""
    if existing is None:
        return {}
    prov = existing.provenance
    if prov.get("final_step") != keys.final_step or prov.get("key_freqs") != keys.key_freqs.tolist():
        return {}
    restricted = existing.values["progress/restricted_loss"]
    excluded = existing.values["progress/excluded_loss"]
    return {int(s): (float(restricted[i]), float(excluded[i])) for i, s in enumerate(existing.steps)}


def step_losses(study: Study, step: int, keys: np.ndarray, device: str = "cpu") -> tuple[float, float]:
    """(restricted, excluded) loss of one step's checkpoint with the key frequencies ``keys``."""
    from circuits.loading import load
    from circuits.progress import modular_addition_outputs, restricted_and_excluded

    out = modular_addition_outputs(load(study.manifest, step, device), study.manifest, device)
    return restricted_and_excluded(out.logits, out.answers, out.train_idx, out.p, keys)


def finalize(study_path: str | Path, device: str = "cpu") -> RunEnd | None:
    """Compute the run-end measures of a study and write ``run_end.h5``; None when it has none.

    Refused (``CircuitsError``) while the run's final checkpoint is missing. Returns what the
    study reads afterwards.
    """
    with open_study(study_path) as study:
        if not needs_run_end(study):
            return None
        if not study.steps:
            raise CircuitsError(f"study {study.path}: no complete step yet, nothing to finalize")
        keys = final_keys(study, device)
        done = _reusable(study.run_end, keys)
        values = {s: done[s] if s in done else step_losses(study, s, keys.key_freqs, device) for s in study.steps}
        if study.run_end_problem is not None:
            _move_aside(study.path / RUN_END_FILE, study.run_end_problem)
        _write(study, keys, values, device)
        return study.refresh().run_end


def after_sweep(out: Path, manifest: Manifest, device: str = "cpu") -> RunEnd | None:
    """The sweep's call: finalize once the run's final step is in the study and the file lags behind."""
    if manifest.local is None or manifest.local.recipe != "modular-addition":
        return None  # the only run with run-end measures; other studies are not even opened
    with open_study(out) as study:
        if not needs_run_end(study) or study.manifest.steps[-1] not in study.steps:
            return None
        current, steps = study.run_end, set(study.steps)
    if current is not None and steps <= set(current.steps.tolist()):
        return current  # every step computed already (a resumed sweep with nothing new)
    return finalize(out, device)


def _move_aside(path: Path, why: str) -> None:
    """A damaged run-end file is kept as ``.corrupt``, never overwritten."""
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    warnings.warn(f"{why.split(';')[0]}; moved to {aside.name}, recomputed", stacklevel=3)


def _write(study: Study, keys: FinalKeys, values: dict[int, tuple[float, float]], device: str) -> Path:
    """Write ``run_end.h5`` atomically: a temporary file, complete mark last, renamed into place."""
    from circuits.visit import library_versions

    final = study.path / RUN_END_FILE
    tmp = final.with_name(f".{RUN_END_FILE}.tmp-{os.getpid()}")
    steps = sorted(values)
    provenance = {
        "what": "restricted and excluded loss of each step with the key frequencies of the run's final checkpoint",
        "final_step": keys.final_step, "key_freqs": keys.key_freqs.tolist(), "n_key": keys.n_key,
        "manifest_name": study.manifest.name, "device": device,
        "written": datetime.now(UTC).isoformat(timespec="seconds"), "versions": library_versions(),
    }
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = RUN_END_FORMAT
            f.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
            f.create_dataset("steps", data=np.asarray(steps, dtype=np.int64))
            f.create_dataset("progress/restricted_loss", data=np.asarray([values[s][0] for s in steps]))
            f.create_dataset("progress/excluded_loss", data=np.asarray([values[s][1] for s in steps]))
            f.create_dataset("progress/key_freqs", data=keys.key_freqs.astype(np.int64))
            f.flush()
            f.attrs["complete"] = True  # the last write: a file without it is not data
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CircuitsError(f"{final}: cannot write the run-end file ({err.strerror or err}); the shards are "
                            f"intact, run `circuits finalize {study.path}` again") from None
    return final
