"""End to end in a real browser: `streamlit run` on the induction study, Debian's chromium
driven headless by Playwright (no browser download).

The journey: open the Circuit page, move the step slider across the induction phase change,
see edges added, click the induction head, see its attention pattern; visit every page.
Screenshots go to test-artifacts/; with CIRCUITS_UPDATE_SCREENSHOTS=1 also to docs/screenshots/
(shown in docs/app.md), so a plain test run leaves the working tree clean.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_app_pages import app_study  # noqa: F401 - the shared study fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
GRAPH = "[data-testid='circuit-graph']"
SHOTS = (ROOT / "test-artifacts",) + ((ROOT / "docs" / "screenshots",) if os.environ.get("CIRCUITS_UPDATE_SCREENSHOTS") else ())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (make browser)")
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")


@contextlib.contextmanager
def serving(cmd: list[str], port: int, log_name: str = "streamlit.log"):
    """Run ``cmd`` (a streamlit server on ``port``) from the repository root until it answers
    its health check; yields its base URL and stops it afterwards."""
    artifacts = ROOT / "test-artifacts"
    log = open(artifacts / log_name, "w") if artifacts.is_dir() else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not come up on {base} (exit {proc.poll()})")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            log.close()


@pytest.fixture(scope="module")
def server(app_study):  # noqa: F811
    """The app as `circuits app` serves it (circuits.app_launcher.command)."""
    need_chromium()
    from circuits.app_launcher import command

    port = _free_port()
    with serving(command(app_study, port=port), port) as base:
        yield base, app_study


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1500})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.errors = errors
        yield pg
        browser.close()


def settle(pg, timeout: float = 30_000) -> None:
    """Wait until the script has finished its rerun (and the page has drawn it)."""
    pg.wait_for_selector(IDLE, timeout=timeout)
    pg.wait_for_timeout(300)
    pg.wait_for_selector(IDLE, timeout=timeout)


def shoot(pg, name: str) -> None:
    for folder in SHOTS:
        folder.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS[0] / f"{name}.png"), full_page=True)
    for folder in SHOTS[1:]:
        shutil.copy(SHOTS[0] / f"{name}.png", folder / f"{name}.png")


def graph_state(pg) -> dict:
    svg = pg.locator(GRAPH).first
    return {k: svg.get_attribute(f"data-{k}") for k in ("step", "edges", "added", "removed")}


def no_traceback(pg) -> None:
    assert pg.locator("[data-testid='stException']").count() == 0, pg.locator("[data-testid='stException']").first.inner_text()


def test_journey_across_the_phase_change(page, server):
    import circuits

    base, study_path = server
    study = circuits.open_study(study_path)
    steps = [int(s) for s in study.steps]
    induction = study.array("heads/induction")[-1]
    layer, head = np.unravel_index(int(np.argmax(induction)), induction.shape)
    node = f"a{layer}.h{head}"

    page.goto(f"{base}/circuit?step={steps[0]}")
    page.wait_for_selector(GRAPH, timeout=60_000)
    settle(page)
    no_traceback(page)
    first = graph_state(page)
    assert first["step"] == str(steps[0])
    shoot(page, "circuit-first-step")

    thumb = page.locator("[data-testid='stSlider'] input[type='range']").first
    seen = [first]
    for step in steps[1:]:
        thumb.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(
            "s => { const g = document.querySelector(\"[data-testid='stApp']\");"
            " const el = [...document.querySelectorAll('*')].map(e => e.shadowRoot).filter(Boolean)"
            ".map(r => r.querySelector(\"[data-testid='circuit-graph']\")).find(Boolean)"
            " || document.querySelector(\"[data-testid='circuit-graph']\");"
            " return el && el.getAttribute('data-step') === s; }", arg=str(step), timeout=30_000)
        settle(page)
        seen.append(graph_state(page))
    assert [s["step"] for s in seen] == [str(s) for s in steps]
    assert any(int(s["added"]) > 0 for s in seen[1:]), seen  # the graph changes: edges added
    assert len({s["edges"] for s in seen}) > 1, seen
    assert f"step={steps[-1]}" in page.url  # state in the URL
    shoot(page, "circuit-last-step")

    page.locator(f"{GRAPH} [data-node='{node}']").click()
    page.wait_for_selector(f".gtitle:has-text('{node} at step {steps[-1]}')", timeout=30_000)
    settle(page)
    assert f"node={node}" in page.url
    assert page.locator("[data-testid='stPlotlyChart']").count() >= 2  # pattern and detector scores
    no_traceback(page)
    shoot(page, "circuit-induction-head")

    # play animates through every step and stops at the last one
    page.goto(f"{base}/circuit?step={steps[0]}")
    page.wait_for_selector(GRAPH, timeout=60_000)
    settle(page)
    page.get_by_role("button", name="Play").click()
    shown = set()
    deadline = time.monotonic() + 60
    while graph_state(page)["step"] != str(steps[-1]) and time.monotonic() < deadline:
        shown.add(graph_state(page)["step"])
        page.wait_for_timeout(200)
    assert graph_state(page)["step"] == str(steps[-1]) and len(shown) >= 2, shown
    page.get_by_role("button", name="Play").wait_for(timeout=30_000)  # stopped by itself

    for name in ("formation", "overview", "heads", "compare"):
        path = "" if name == "formation" else name  # the landing page lives at /
        page.goto(f"{base}/{path}?step={steps[-1]}&node={node}")
        page.wait_for_selector("[data-testid='stPlotlyChart']", timeout=60_000)
        settle(page)
        no_traceback(page)
        shoot(page, name)
    assert not page.errors, page.errors
