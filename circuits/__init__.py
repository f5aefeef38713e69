"""circuits: mechanistic interpretability across training checkpoints.

Data flows one way: manifest -> model -> per-step visit -> shards -> study -> tracking -> app.
Heavy modules (torch, transformer_lens, h5py) load on first use, so ``import circuits`` is cheap.
"""

from __future__ import annotations

from typing import Any

from circuits.errors import CircuitsError

__version__ = "0.1.0"

_LAZY = {
    "load_manifest": "circuits.manifest",
    "Manifest": "circuits.manifest",
    "select_steps": "circuits.steps",
    "load": "circuits.loading",
    "train_recipe": "circuits.recipes",
    "Task": "circuits.tasks",
    "make_task": "circuits.tasks",
    "load_task_file": "circuits.task_files",
    "open_study": "circuits.store",
    "from_model": "circuits.runs",
    "CheckpointSaver": "circuits.training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")


__all__ = ["CircuitsError", "__version__", *_LAZY]
