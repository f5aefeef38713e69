"""Benchmark ``app``: the app, server side: opening a study and moving to another step.

``bench_app()`` writes a synthetic study shaped like a Pythia-70m sweep (154 checkpoints,
6 layers x 8 heads with MLPs, a circuit of ~1,000 edges per step drifting over training,
head scores, attention patterns) through the library's own shard writer, then drives the
Circuit page with Streamlit's AppTest:

- ``open_s``: the first run of the Circuit page on the study, caches cleared (study opened,
  every step's graph read, first graph drawn); ``open_overview_s`` the same for the Overview
  page (tracking of the whole study: phases, circuit series);
- ``step_switch_ms``: moving the step slider to another step and rerunning. AppTest reruns the
  whole page, while in the browser only the graph fragment reruns: an upper bound.

Goals (issue 6): step switch <= 200 ms, open <= 3 s. The app is driven by its main file's
path (``circuits.app_launcher.APP_MAIN``, the installed app or ``app/main.py`` in a checkout):
nothing here imports the app's package. ``app_figures()`` (``circuits bench app``) reports the
figures against their goals.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from circuits.app_launcher import APP_MAIN as MAIN
from circuits.bench.common import figure, quietly

GOAL_SWITCH_MS = 200.0
GOAL_OPEN_S = 3.0


def synthetic_study(out: Path, n_edges: int = 1000, n_examples: int = 4, seq_len: int = 24, seed: int = 0,
                    n_steps: int | None = None) -> Path:
    """Write a study of the pythia-70m schedule (154 steps, or its first ``n_steps``) with
    synthetic arrays through the library's shard writer; returns ``out``."""
    import torch

    from circuits import store
    from circuits.config import SweepConfig
    from circuits.graph import GraphSpec
    from circuits.manifest import load_manifest
    from circuits.sweep import study_record
    from circuits.tasks import Task

    manifest = load_manifest("pythia-70m")
    n_layers, n_heads = 6, 8
    spec = GraphSpec(n_layers, n_heads, has_mlp=True, parallel_attn_mlp=True)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 1000, (n_examples, seq_len), generator=g)
    task = Task("synthetic", clean, torch.randint(0, 1000, (n_examples, seq_len), generator=g),
                torch.full((n_examples, 1), -1), clean[:, -1:].clone())
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=n_layers, n_heads=n_heads, d_model=512, d_head=64,
                                                d_vocab=50304, n_ctx=2048))
    # The sweep's own study record, so the app reads what a real sweep writes.
    record = study_record(manifest, task, model, SweepConfig(options={"synthetic": True}), [])
    out.mkdir(parents=True, exist_ok=True)
    (out / store.SHARD_DIR).mkdir(exist_ok=True)
    store.write_study_json(out, record)

    steps = list(manifest.steps)[:n_steps]
    valid = spec.valid
    base = rng.normal(size=spec.shape).astype(np.float32)
    drift = rng.normal(size=spec.shape).astype(np.float32)
    causal = np.tril(np.ones((seq_len, seq_len), dtype=np.float32))
    task_datasets = {f"task/{k}": v for k, v in store.task_arrays(task).items()}  # the same every step
    with store.BackgroundWriter(depth=4) as writer:
        for i, step in enumerate(steps):
            t = i / max(len(steps) - 1, 1)
            scores = np.where(valid, base * (1 - t) + drift * t + 0.1 * rng.normal(size=spec.shape), np.nan)
            scores = scores.astype(np.float32)
            order = np.argsort(-np.nan_to_num(np.abs(scores), nan=-1.0), axis=None)[:n_edges]
            in_circuit = np.zeros(spec.shape, dtype=bool)
            in_circuit.flat[order] = True
            logits = rng.normal(size=(n_examples, n_heads * n_layers, seq_len, seq_len)).astype(np.float32)
            patterns = np.exp(np.where(causal > 0, logits, -np.inf))
            patterns /= patterns.sum(-1, keepdims=True)
            patterns = patterns.reshape(n_examples, n_layers, n_heads, seq_len, seq_len).astype(np.float16)
            shard = store.ShardWriter(out / store.SHARD_DIR / store.shard_name(step), n_examples, n_examples, writer)
            shard.write_static(task_datasets)
            metric = np.full(n_examples, 4 * t, dtype=np.float32)
            shard.write_batch(0, {
                store.PATTERNS: store.pack_patterns(patterns),
                "outputs/metric_clean": metric, "outputs/metric_corrupted": metric * 0,
                "outputs/loss_clean": np.full(n_examples, 4 - 3 * t, dtype=np.float32),
                "outputs/loss_corrupted": np.full(n_examples, 4.0, dtype=np.float32),
            })
            heads = rng.uniform(size=(3, n_layers, n_heads)).astype(np.float32) * t
            shard.write_static({
                "circuit/scores": scores, "circuit/in_circuit": in_circuit,
                "circuit/faithfulness": np.float32(0.5 + 0.4 * t), "circuit/n_edges": np.int64(in_circuit.sum()),
                "heads/induction": heads[0], "heads/previous_token": heads[1], "heads/duplicate_token": heads[2],
            })
            shard.finish({"step": step, "tokens_seen": manifest.tokens_seen(step), "synthetic": True})
        writer.wait()
    layouts, tokens, _ = store.shard_layouts(sorted(store.scan_shards(out).items()))
    store.write_index(out, layouts, tokens, {k: v for k, v in record.items() if k != "task"})
    return out


def _circuit_page(study: Path, **params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(MAIN), default_timeout=120)
    at.query_params["study"] = str(study)
    for key, value in params.items():
        at.query_params[key] = str(value)
    at.switch_page("views/circuit.py")
    return at


def measure(study: Path, n_switches: int = 20) -> dict:
    """Open the Circuit page on ``study`` (cold caches), then move the slider ``n_switches`` times."""
    import streamlit as st

    from circuits.errors import CircuitsError

    if not MAIN.exists():
        raise CircuitsError(f"the app benchmark needs the app's files: {MAIN} is missing (reinstall circuits)")
    import circuits

    steps = [int(s) for s in circuits.open_study(study).steps]
    opens = []
    at = None
    for _ in range(3):
        st.cache_data.clear()
        st.cache_resource.clear()
        at = _circuit_page(study, step=steps[0], node="a1.h3")
        start = time.perf_counter()
        at.run()
        opens.append(time.perf_counter() - start)
        if at.exception:
            raise RuntimeError(f"the Circuit page failed: {at.exception[0].value}")
    if at is None:  # the loop above always runs: this only narrows ``at`` for the type checker
        raise RuntimeError("the Circuit page was never opened")
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    overview = AppTest.from_file(str(MAIN), default_timeout=120)
    overview.query_params["study"] = str(study)
    start = time.perf_counter()
    overview.run()
    open_overview = time.perf_counter() - start
    if overview.exception:
        raise RuntimeError(f"the Overview page failed: {overview.exception[0].value}")
    picks = np.linspace(1, len(steps) - 1, n_switches).astype(int)
    switches = []
    for i in picks:
        slider = at.select_slider(key="circuit.step").set_value(steps[i])
        start = time.perf_counter()
        slider.run()
        switches.append((time.perf_counter() - start) * 1000)
        if at.exception:
            raise RuntimeError(f"the Circuit page failed at step {steps[i]}: {at.exception[0].value}")
    edges = {m.label: m.value for m in at.metric}.get("Edges drawn")
    return {
        "n_steps": len(steps),
        "edges_drawn_last": int(edges) if edges else None,
        "open_s_first": round(opens[0], 3),
        "open_s_median": round(statistics.median(opens), 3),
        "open_overview_s": round(open_overview, 3),
        "step_switch_ms_median": round(statistics.median(switches), 1),
        "step_switch_ms_max": round(max(switches), 1),
        "goal_open_s": GOAL_OPEN_S,
        "goal_step_switch_ms": GOAL_SWITCH_MS,
        "meets_goals": max(statistics.median(opens), open_overview) <= GOAL_OPEN_S and statistics.median(switches) <= GOAL_SWITCH_MS,
    }


def bench_app(json_out: bool = False) -> dict:
    """Write the synthetic study in a temporary folder, measure, print a summary (or JSON)."""
    with tempfile.TemporaryDirectory(prefix="circuits-app-bench-") as tmp:
        start = time.perf_counter()
        study = synthetic_study(Path(tmp) / "study")
        written = time.perf_counter() - start
        result = {"study_written_s": round(written, 2), **measure(study)}
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(f"app: {result['n_steps']} steps, ~{result['edges_drawn_last']} edges drawn; "
              f"open {result['open_s_median']:.2f} s (Circuit), {result['open_overview_s']:.2f} s (Overview, "
              f"with tracking; goal <= {GOAL_OPEN_S:g} s), "
              f"step switch {result['step_switch_ms_median']:.0f} ms median, "
              f"{result['step_switch_ms_max']:.0f} ms max (goal <= {GOAL_SWITCH_MS:g} ms, whole-page rerun)")
    return result



def app_figures(device: str = "cpu") -> dict[str, Any]:
    """``bench_app`` on its synthetic Pythia-70m-shaped study, as figures (``device`` is unused:
    the app reads a study, no model)."""
    raw = quietly(bench_app)
    return {
        "figures": {
            "step_switch_ms": figure(raw["step_switch_ms_median"], "ms", goal=raw["goal_step_switch_ms"]),
            "step_switch_ms_max": figure(raw["step_switch_ms_max"], "ms"),
            "open_circuit_s": figure(raw["open_s_median"], "s", goal=raw["goal_open_s"]),
            "open_overview_s": figure(raw["open_overview_s"], "s", goal=raw["goal_open_s"]),
        },
        "model": {"study": f"synthetic, {raw['n_steps']} steps, ~{raw['edges_drawn_last']} edges drawn",
                  "device": "cpu (the app reads the study; no model)"},
    }
