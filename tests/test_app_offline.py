"""The app makes no request beyond the machine: every page, opened in a real browser (Debian's
chromium through Playwright), asks for nothing from a host other than the loopback one it is
served from; served as ``circuits app`` serves it, and as a plain ``streamlit run app/main.py``
from the repository root (which reads ``.streamlit/config.toml``).

Every request of the browser context is routed: one to 127.0.0.1 / localhost / ::1 goes on,
any other is aborted and recorded (so the test passes or fails the same with or without a
network), and the test names them all. WebSockets, which are not routed, are recorded from the
page's events.
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

import pytest
from test_app_browser import (  # noqa: F401 - the browser fixtures
    GRAPH,
    _free_port,
    need_chromium,
    page,
    server,
    serving,
    settle,
)
from test_app_pages import app_study  # noqa: F401 - the shared study fixture

pytestmark = pytest.mark.slow

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PAGES = ("", "overview", "circuit", "heads", "compare")  # formation is the landing page, at /
DRAWN = f"[data-testid='stPlotlyChart'], {GRAPH}"


@pytest.fixture(scope="module")
def plain_server(app_study):  # noqa: F811
    """`streamlit run app/main.py -- --study STUDY` from the repository root, no options given."""
    need_chromium()
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless=true",
           f"--server.port={port}", "--", "--study", str(app_study)]
    with serving(cmd, port, "streamlit-plain.log") as base:
        yield base


def _external(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("data", "blob", "about") and parts.hostname not in LOCAL_HOSTS


def _requests_beyond_the_machine(pg, base: str) -> list[str]:
    """Open every page of the app at ``base``; the requests it tried beyond loopback (blocked)."""
    attempted: list[str] = []

    def guard(route):
        if _external(route.request.url):
            attempted.append(f"{route.request.resource_type} {route.request.url}")
            route.abort("blockedbyclient")
        else:
            route.continue_()

    def websocket(ws):
        if _external(ws.url):
            attempted.append(f"websocket {ws.url}")

    pg.context.route("**/*", guard)
    pg.on("websocket", websocket)
    try:
        for path in PAGES:
            pg.goto(f"{base}/{path}")
            pg.wait_for_selector(DRAWN, timeout=60_000)  # the page drew the study, not a message
            settle(pg)
            assert pg.locator("[data-testid='stException']").count() == 0, path
            pg.wait_for_timeout(500)  # the favicon and usage statistics are asked for after the run
    finally:
        pg.context.unroute("**/*", guard)
        pg.remove_listener("websocket", websocket)
    return list(dict.fromkeys(attempted))


def test_no_page_requests_anything_beyond_the_machine(page, server):  # noqa: F811
    base, _ = server
    attempted = _requests_beyond_the_machine(page, base)
    assert not attempted, "requests beyond the machine:\n" + "\n".join(attempted)
    assert page.evaluate("document.querySelector(\"link[rel='shortcut icon']\").href").startswith(
        "data:image/svg+xml")  # the favicon shipped with the app (app/favicon.svg), inlined


def test_streamlit_run_from_the_checkout_stays_offline_too(page, plain_server):  # noqa: F811
    attempted = _requests_beyond_the_machine(page, plain_server)
    assert not attempted, "requests beyond the machine:\n" + "\n".join(attempted)
