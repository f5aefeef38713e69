"""Memory bounded by a budget, not by the model: how many examples and copies to stack.

Every stacked computation of discovery (the gradient runs of EAP and EAP-IG, the ablated
copies of patching, faithfulness and node effects) goes through :meth:`Budget.plan`: given
what one *unit* costs (one example in one copy: a residual per writer, per port, the autograd
graph) it returns how many examples per chunk and how many copies per forward fit the budget.
Results do not depend on the chunking: scores are per example and summed or stacked, metrics
are per example (tests compare chunked and unchunked to 1e-6).

The budget covers the working set of one chunk; what a step keeps whole (the corrupted
run's writer outputs, n_forward x batch x pos x d_model floats: 0.5 GB at Pythia-160m shape
with 32 x 33 tokens; ``FunctionalModel.cost(task, "kept")`` per example) is not chunked. Default: the smaller of
2 GiB and half the memory available (``MemAvailable``; on CUDA the device's free memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from circuits.config import MAX_MEMORY_DEFAULT, parse_memory


@dataclass(frozen=True)
class Chunks:
    """``examples`` rows per chunk, ``copies`` stacked per forward (both >= 1)."""

    examples: int
    copies: int


@dataclass(frozen=True)
class Budget:
    """At most ``bytes`` for the working set of one chunk."""

    bytes: int

    def plan(self, per_unit: float, n_examples: int, n_copies: int = 1, per_example: float = 0.0) -> Chunks:
        """Examples per chunk and copies per forward such that ``examples * (per_example +
        copies * per_unit)`` fits: all examples first (fewer, larger forwards), then copies.

        ``per_unit``: bytes of one example in one copy; ``per_example``: bytes one example
        needs once per chunk whatever the copies (its reference outputs, gradient sums).
        """
        per_row = per_example + per_unit
        most = int(max(1, min(n_examples, self.bytes // max(per_row, 1.0))))
        examples = -(-n_examples // -(-n_examples // most))  # even: 8 rows in chunks of at most 7 run as 4 + 4, not 7 + 1
        room = self.bytes / examples - per_example
        copies = int(max(1, min(n_copies, room // max(per_unit, 1.0))))
        return Chunks(examples, copies)


def available_bytes(device: torch.device | str) -> int:
    """Memory free for this process now: ``MemAvailable`` on the host, free memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def make_budget(max_memory: Any, device: torch.device | str) -> Budget:
    """``max_memory`` (``--max-memory``: bytes or a size such as ``2GB``), or the default."""
    if max_memory is not None:
        return Budget(parse_memory(max_memory))
    return Budget(int(min(MAX_MEMORY_DEFAULT, available_bytes(device) // 2)))
