"""The app makes no request beyond the machine: every page, opened in a real browser (Debian's
chromium through Playwright, served as ``circuits app`` serves it), asks for nothing from a
host other than the loopback one it is served from.

Every request of the browser context is routed: one to 127.0.0.1 / localhost / ::1 goes on,
any other is aborted and recorded (so the test passes or fails the same with or without a
network), and the test names them all. Requests that are not routed (WebSockets) are
recorded from the page's events too.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from test_app_browser import IDLE, page, server, settle  # noqa: F401 - the browser fixtures
from test_app_pages import app_study  # noqa: F401 - the shared study fixture

pytestmark = pytest.mark.slow

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PAGES = ("", "circuit", "heads", "compare")  # overview is the default page, at /


def _external(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("data", "blob", "about") and parts.hostname not in LOCAL_HOSTS


def test_no_page_requests_anything_beyond_the_machine(page, server):  # noqa: F811
    base, _ = server
    attempted: list[str] = []

    def guard(route):
        url = route.request.url
        if _external(url):
            attempted.append(f"{route.request.resource_type} {url}")
            route.abort("blockedbyclient")
        else:
            route.continue_()

    context = page.context
    context.route("**/*", guard)
    page.on("websocket", lambda ws: attempted.append(f"websocket {ws.url}") if _external(ws.url) else None)
    try:
        for path in PAGES:
            page.goto(f"{base}/{path}")
            page.wait_for_selector(IDLE, timeout=60_000)
            settle(page)
            # the favicon is set by the script's page config, then fetched: give it its turn
            page.wait_for_timeout(500)
    finally:
        context.unroute("**/*", guard)
    assert not attempted, "requests beyond the machine:\n" + "\n".join(dict.fromkeys(attempted))
