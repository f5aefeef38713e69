"""What every benchmark shares: the ``Benchmark`` record, ``figure`` (one measured value against
its goal), ``machine`` (where it was measured), ``quietly`` and ``print_result``."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[..., dict[str, Any]]


def figure(value: float, unit: str, goal: float | None = None, better: str = "lower") -> dict[str, Any]:
    """One measured figure; ``ok`` says whether it meets ``goal`` (lower or higher is better)."""
    ok = None if goal is None else (value <= goal if better == "lower" else value >= goal)
    return {"value": float(value), "unit": unit, "goal": goal, "better": better, "ok": ok}


def induction_run(run: str | None, scratch: Path, context: dict[str, Any]) -> Path:
    """``run``, or the built-in induction run trained into ``scratch`` (its time in ``context``)."""
    if run is not None:
        return Path(run)
    from circuits.recipes import train_recipe

    t0 = time.perf_counter()
    train_recipe("induction", scratch / "run", progress=False)
    context["train_s"] = round(time.perf_counter() - t0, 1)
    return scratch / "run"


def machine() -> dict[str, Any]:
    """Where the figures were measured: CPU model, cores, torch threads, GPU if used."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__}



def quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a benchmark that prints its own summary, keeping stdout for our table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def print_result(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench {result['benchmark']}: {result['description']}")
    several = "results" in result  # `bench all`: one row per figure of every benchmark
    for column in ("benchmark", "figure", "value", "goal", "ok") if several else ("figure", "value", "goal", "ok"):
        table.add_column(column, justify="left" if column in ("benchmark", "figure") else "right")
    for key, fig in result["figures"].items():
        goal = "" if fig["goal"] is None else f"{'<=' if fig['better'] == 'lower' else '>='} {fig['goal']:g}"
        ok = "" if fig["ok"] is None else ("[green]yes[/]" if fig["ok"] else "[red]no[/]")
        row = [*key.split(": ", 1)] if several else [key]
        table.add_row(*row, f"{fig['value']:.4g} {fig['unit']}", goal, ok)
    for name, sub in result.get("results", {}).items():
        if "error" in sub:
            table.add_row(name, "[red]failed[/]", sub["error"][:80], "", "")
    console = Console()
    console.print(table)
    for name, sub in result.get("results", {}).items():
        console.print(f"{name}: {sub.get('seconds', '?')} s" + (f"; model: {sub['model']}" if "model" in sub else ""))
    for key in ("model", "batch"):
        if key in result:
            console.print(f"{key}: {result[key]}")
    m = result["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
                  f"load {m['load_avg_1m']}; {result['seconds']} s")

