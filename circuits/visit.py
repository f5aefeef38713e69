"""The per-step visit: everything that needs a loaded checkpoint happens in one visit.

Loading a checkpoint is the expensive part (for Pythia, a download per step), so a sweep
loads each step once and runs every analysis on it. An analysis is a function

    analysis(ctx: VisitContext) -> dict[str, np.ndarray | float | int]

whose arrays have the same shape at every step; the store writes them into the step's shard
under ``/{analysis_name}/{key}`` and the index stacks them over steps (``study.array(...)``).
Built-in analyses: ``circuit`` (circuits.discovery), ``heads`` (circuits.detectors),
``progress`` (circuits.progress).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from circuits.manifest import Manifest
from circuits.tasks import Task

AnalysisResult = dict[str, "np.ndarray | float | int"]


@dataclass
class VisitContext:
    """What an analysis gets: the model at one step, the task, and the run it came from.

    ``cache`` holds the clean run's attention patterns and cached activations when the sweep
    already made them (a dict of tensors keyed by TL hook names), so analyses can reuse them.
    """

    model: Any  # transformer_lens TransformerBridge, eval mode
    task: Task
    manifest: Manifest
    step: int
    device: str = "cpu"
    cache: Any | None = None
    options: dict[str, Any] = field(default_factory=dict)


Analysis = Callable[[VisitContext], AnalysisResult]
