"""Benchmark ``app``: the app as its user feels it (in the browser) and on the server.

Server side (Streamlit's AppTest, as before): ``synthetic_study()`` writes a synthetic study
shaped like a Pythia-70m sweep (154 checkpoints, 6 layers x 8 heads with MLPs, a circuit of
~1,000 edges per step drifting over training, head scores, attention patterns) through the
library's own shard writer, then the Circuit page is driven with AppTest:

- ``open_s``: the first run of the Circuit page on the study, caches cleared (study opened,
  every step's graph read, first graph drawn); ``open_landing_s`` the same for the landing page
  (Formation: tracking of the whole study, phases, circuit series, and its graph);
- ``step_switch_ms``: moving the step slider to another step and rerunning. AppTest reruns the
  whole page, while in the browser only the graph fragment reruns: an upper bound.

In the browser (``browser_measure``): ``streamlit run`` as ``circuits app`` starts it, Debian's
chromium driven headless by Playwright at 1400 x 900, on a study (``--study``, e.g. the demo's;
without it a synthetic study of the demo's shape: the induction-2l schedule, 2 layers x 4
heads, attention only) and on a synthetic Pythia-160m-shaped study (154 steps, 12 x 12 with
MLPs: ~32k edges per step). Timed inside the page (``performance.now()``), so Playwright's own
latency is not counted:

- ``page_open_s``: navigation start to the Circuit page's graph drawn (the component's
  ``performance.mark('circuits-graph')``), first on a fresh server (cold) and on reloads;
- ``landing_open_s``: the same for the landing page (Formation), after the Circuit page: its first
  open (``_first``) tracks the study once, later opens read the cached tracking;
- ``step_switch_ms``: the slider's ArrowRight keydown to the graph drawn at the next step,
  median and range over ``n_switches`` switches;
- ``node_click_ms``: a click on a head in the graph to its attention pattern shown in the panel;
- ``graph_drawing_ms``: of a step switch, the time the component's JS itself takes to draw.

Goals (issue 16): in the browser, step switch <= 200 ms median and page open <= 3 s on the demo
study, step switch <= 400 ms on the 160m-sized one; server side (issue 6) step switch <= 200 ms,
open <= 3 s. The app is driven by its main file's path (``circuits.app_launcher.APP_MAIN``, the
installed app or ``app/main.py`` in a checkout): nothing here imports the app's package.
``app_figures()`` (``circuits bench app``) reports the figures against their goals.
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
from circuits.errors import CircuitsError

GOAL_SWITCH_MS = 200.0
GOAL_OPEN_S = 3.0
GOAL_SWITCH_MS_160M = 400.0

# Shapes of synthetic studies: (manifest whose schedule it takes, layers, heads, MLPs, parallel attn+MLP)
SHAPES = {
    "70m": ("pythia-70m", 6, 8, True, True),
    "160m": ("pythia-160m", 12, 12, True, True),  # 32,111 edges per step
    "demo": ("induction-2l", 2, 4, False, False),  # the demo's model: 81 edges
}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT_SIZE = (1400, 900)


def synthetic_study(out: Path, n_edges: int = 1000, n_examples: int = 4, seq_len: int = 24, seed: int = 0,
                    n_steps: int | None = None, shape: str = "70m") -> Path:
    """Write a study of ``shape`` (``SHAPES``: the pythia-70m schedule and model shape by default,
    154 steps, or its first ``n_steps``) with synthetic arrays through the library's shard
    writer; returns ``out``."""
    import torch

    from circuits import store
    from circuits.config import SweepConfig
    from circuits.graph import GraphSpec
    from circuits.manifest import load_manifest
    from circuits.sweep import study_record
    from circuits.tasks import Task

    if shape not in SHAPES:
        raise CircuitsError(f"unknown synthetic study shape {shape!r}; expected one of {', '.join(SHAPES)}")
    manifest_name, n_layers, n_heads, has_mlp, parallel = SHAPES[shape]
    manifest = load_manifest(manifest_name)
    spec = GraphSpec(n_layers, n_heads, has_mlp=has_mlp, parallel_attn_mlp=parallel)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 1000, (n_examples, seq_len), generator=g)
    task = Task("synthetic", clean, torch.randint(0, 1000, (n_examples, seq_len), generator=g),
                torch.full((n_examples, 1), -1), clean[:, -1:].clone())
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=n_layers, n_heads=n_heads, d_model=512, d_head=64,
                                                d_vocab=50304, n_ctx=2048, attn_only=not has_mlp,
                                                parallel_attn_mlp=parallel))
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
    open_landing = time.perf_counter() - start
    if overview.exception:
        raise RuntimeError(f"the landing page failed: {overview.exception[0].value}")
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
        "open_landing_s": round(open_landing, 3),
        "step_switch_ms_median": round(statistics.median(switches), 1),
        "step_switch_ms_max": round(max(switches), 1),
        "goal_open_s": GOAL_OPEN_S,
        "goal_step_switch_ms": GOAL_SWITCH_MS,
        "meets_goals": max(statistics.median(opens), open_landing) <= GOAL_OPEN_S and statistics.median(switches) <= GOAL_SWITCH_MS,
    }


# ---------------------------------------------------------------- in the browser

# In the page: resolves with performance.now() when the graph component marks a drawing of
# ``step`` made after ``since`` (the component ends each drawing with performance.mark).
_DRAWN = """([step, since]) => new Promise(resolve => {
  const hit = () => performance.getEntriesByName('circuits-graph')
    .find(m => m.startTime > since && m.detail && String(m.detail.step) === String(step));
  const found = hit();
  if (found) return resolve(found.startTime);
  const obs = new PerformanceObserver(() => { const m = hit(); if (m) { obs.disconnect(); resolve(m.startTime); } });
  obs.observe({ type: 'mark' });
})"""
# How long the component's own drawing of ``step`` (after ``since``) took, in ms.
_DRAWING_MS = """([step, since]) => { const m = performance.getEntriesByName('circuits-graph')
  .find(m => m.startTime > since && m.detail && String(m.detail.step) === String(step));
  return m ? m.startTime - m.detail.began : null; }"""
# Remembers when the last key went down or the last click happened, inside the page.
_INPUT_CLOCK = """() => { if (window.__benchClock) return;
  window.__benchClock = { key: 0, click: 0 };
  window.addEventListener('keydown', () => { window.__benchClock.key = performance.now(); }, true);
  window.addEventListener('click', () => { window.__benchClock.click = performance.now(); }, true);
}"""
# Resolves with performance.now() when a chart title naming ``text`` is on the page.
_PANEL = """(text) => new Promise(resolve => {
  const seen = () => [...document.querySelectorAll('.gtitle')].some(t => t.textContent.includes(text));
  if (seen()) return resolve(performance.now());
  const obs = new MutationObserver(() => { if (seen()) { obs.disconnect(); resolve(performance.now()); } });
  obs.observe(document.body, { subtree: true, childList: true, characterData: true });
})"""
_IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def browser_missing() -> str | None:
    """Why the browser figures cannot be measured here (None when they can)."""
    import importlib.util

    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (`make browser` installs Debian's chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    return None


def _serve(study: Path, port: int):
    """Start ``streamlit run`` on ``study`` as ``circuits app`` does; returns (process, base URL)."""
    import subprocess
    import urllib.request

    from circuits.app_launcher import command

    proc = subprocess.Popen(command(study, port=port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"streamlit did not come up on {base} (exit {proc.poll()})")
        time.sleep(0.3)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settle(page) -> None:
    page.wait_for_selector(_IDLE, timeout=120_000)


def browser_measure(study: Path, n_switches: int = 12, n_opens: int = 3, node: str = "a1.h1") -> dict:
    """Open the Circuit page of ``study`` in chromium ``n_opens`` times (the first on a fresh
    server), switch step ``n_switches`` times with the slider's arrow key, click ``node`` and
    the next heads; times measured in the page (see the module's docstring)."""
    from playwright.sync_api import sync_playwright

    import circuits

    steps = [int(s) for s in circuits.open_study(study).steps]
    n_switches = min(n_switches, len(steps) - 1)
    proc, base = _serve(study, _free_port())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": VIEWPORT_SIZE[0], "height": VIEWPORT_SIZE[1]})
            opens = []
            for _ in range(n_opens):
                page.goto(f"{base}/circuit?step={steps[0]}")
                opens.append(page.evaluate(_DRAWN, [steps[0], 0]) / 1000)
                _settle(page)
            page.evaluate(_INPUT_CLOCK)
            thumb = page.locator("[data-testid='stSlider'] input[type='range']").first
            switches, drawing = [], []
            for i in range(1, n_switches + 1):
                thumb.focus()
                page.keyboard.press("ArrowRight")
                key_at = page.evaluate("() => window.__benchClock.key")
                drawn = page.evaluate(_DRAWN, [steps[i], key_at])
                switches.append(drawn - key_at)
                drawing.append(page.evaluate(_DRAWING_MS, [steps[i], key_at]))
                _settle(page)
            clicks = []
            layer, head = (int(x) for x in node[1:].split(".h"))
            for k in range(3):
                name = f"a{layer}.h{(head + k) % 4}"
                # the watch starts before the click (a promise kept in the page), so it cannot miss the panel
                page.evaluate(f"(t) => {{ window.__benchPanel = ({_PANEL})(t); }}", f"{name} at step {steps[n_switches]}")
                page.locator(f"[data-testid='circuit-graph'] [data-node='{name}'] .shape").click()
                shown = page.evaluate("() => window.__benchPanel")
                clicks.append(shown - page.evaluate("() => window.__benchClock.click"))
                _settle(page)
            # at the last step shown: the step's edges drawn one by one (not those removed since the one before)
            edges = page.locator("[data-testid='circuit-graph'] .cg-edge:not([data-status='removed'])").count()
            bundles = page.locator("[data-testid='circuit-graph'] .cg-bundle").count()
            landing = []  # the landing page (Formation): its first open tracks the study (cached after)
            for _ in range(n_opens):
                page.goto(f"{base}/?step={steps[0]}")
                landing.append(page.evaluate(_DRAWN, [steps[0], 0]) / 1000)
                _settle(page)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "n_steps": len(steps),
        "edges_drawn": edges, "bundles_drawn": bundles,
        "landing_open_s_first": round(landing[0], 3),
        "landing_open_s_median": round(statistics.median(landing[1:] or landing), 3),
        "page_open_s_cold": round(opens[0], 3),
        "page_open_s_median": round(statistics.median(opens[1:] or opens), 3),
        "step_switch_ms_median": round(statistics.median(switches), 1),
        "step_switch_ms_min": round(min(switches), 1), "step_switch_ms_max": round(max(switches), 1),
        "n_switches": len(switches),
        "graph_drawing_ms_median": round(statistics.median(drawing), 1),  # the component's JS alone
        "node_click_ms_median": round(statistics.median(clicks), 1),
        "node_click_ms_max": round(max(clicks), 1),
    }


def bench_app(json_out: bool = False, study: str | None = None, browser: bool = True) -> dict:
    """Server-side figures on the synthetic Pythia-70m-shaped study; browser figures (when
    chromium and Playwright are here and ``browser``) on ``study`` (else a synthetic study of the
    demo's shape) and on a synthetic Pythia-160m-shaped one. Prints a summary (or JSON)."""
    with tempfile.TemporaryDirectory(prefix="circuits-app-bench-") as tmp:
        start = time.perf_counter()
        synthetic = synthetic_study(Path(tmp) / "study")
        written = time.perf_counter() - start
        result: dict[str, Any] = {"study_written_s": round(written, 2), **measure(synthetic)}
        missing = browser_missing() if browser else "not asked (browser=False)"
        result["browser_skipped"] = missing
        if missing is None:
            demo = Path(study) if study else synthetic_study(Path(tmp) / "demo", n_edges=40, n_examples=8,
                                                              seq_len=33, shape="demo")
            result["browser_demo"] = {"study": str(study) if study else "synthetic, demo-shaped",
                                      **browser_measure(demo)}
            big = synthetic_study(Path(tmp) / "160m", shape="160m")
            result["browser_160m"] = {"study": "synthetic, Pythia-160m-shaped", **browser_measure(big)}
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(f"app: {result['n_steps']} steps, ~{result['edges_drawn_last']} edges drawn; "
              f"open {result['open_s_median']:.2f} s (Circuit), {result['open_landing_s']:.2f} s (Formation, the landing page, "
              f"with tracking; goal <= {GOAL_OPEN_S:g} s), "
              f"step switch {result['step_switch_ms_median']:.0f} ms median, "
              f"{result['step_switch_ms_max']:.0f} ms max (goal <= {GOAL_SWITCH_MS:g} ms, whole-page rerun)")
        for key in ("browser_demo", "browser_160m"):
            if key in result:
                b = result[key]
                print(f"browser, {b['study']}: open {b['page_open_s_median']:.2f} s ({b['page_open_s_cold']:.2f} s "
                      f"cold), step switch {b['step_switch_ms_median']:.0f} ms median "
                      f"({b['step_switch_ms_min']:.0f}-{b['step_switch_ms_max']:.0f}), node click to panel "
                      f"{b['node_click_ms_median']:.0f} ms")
        if result["browser_skipped"]:
            print(f"browser figures skipped: {result['browser_skipped']}")
    return result


def app_figures(device: str = "cpu", study: str | None = None) -> dict[str, Any]:
    """``bench_app`` as figures (``device`` is unused: the app reads a study, no model)."""
    raw = quietly(bench_app, study=study)
    figures = {
        "step_switch_ms": figure(raw["step_switch_ms_median"], "ms", goal=raw["goal_step_switch_ms"]),
        "step_switch_ms_max": figure(raw["step_switch_ms_max"], "ms"),
        "open_circuit_s": figure(raw["open_s_median"], "s", goal=raw["goal_open_s"]),
        "open_landing_s": figure(raw["open_landing_s"], "s", goal=raw["goal_open_s"]),
    }
    for key, label, goal in (("browser_demo", "browser demo", GOAL_SWITCH_MS),
                             ("browser_160m", "browser 160m", GOAL_SWITCH_MS_160M)):
        if key not in raw:
            continue
        b = raw[key]
        figures |= {
            f"{label}: step_switch_ms": figure(b["step_switch_ms_median"], "ms", goal=goal),
            f"{label}: step_switch_ms_range": figure(b["step_switch_ms_max"] - b["step_switch_ms_min"], "ms"),
            f"{label}: page_open_s": figure(b["page_open_s_median"], "s", goal=GOAL_OPEN_S if key == "browser_demo" else None),
            f"{label}: page_open_s_cold": figure(b["page_open_s_cold"], "s"),
            f"{label}: landing_open_s": figure(b["landing_open_s_median"], "s",
                                               goal=GOAL_OPEN_S if key == "browser_demo" else None),
            f"{label}: landing_open_s_first": figure(b["landing_open_s_first"], "s"),
            f"{label}: node_click_ms": figure(b["node_click_ms_median"], "ms"),
        }
    browser = {k: raw[k] for k in ("browser_demo", "browser_160m") if k in raw}
    return {
        "figures": figures,
        "model": {"study": f"server side: synthetic, {raw['n_steps']} steps, ~{raw['edges_drawn_last']} edges drawn; "
                           + ("browser: " + "; ".join(f"{b['study']} ({b['n_steps']} steps)" for b in browser.values())
                              if browser else f"browser figures skipped: {raw['browser_skipped']}"),
                  "device": "cpu (the app reads the study; no model)",
                  "browser": browser or None},
    }
