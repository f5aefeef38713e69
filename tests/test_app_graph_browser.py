"""The circuit graph in a real browser (Debian's chromium, headless, 1400 x 900, driven by
Playwright against `circuits app`): arrowheads, q/k/v entry points, the whole graph on screen,
and a clicked node's edges highlighted while the others dim."""

from __future__ import annotations

import pytest
from test_app_browser import (
    ARGS,
    CHROMIUM,
    GRAPH,
    _free_port,
    need_chromium,
    no_traceback,
    serving,
    settle,
)
from test_app_pages import app_study  # noqa: F401 - the shared study fixture

pytestmark = pytest.mark.slow

VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(scope="module")
def graph_page(app_study):  # noqa: F811
    """The Circuit page at the study's last step (it has a circuit: edges into heads' ports)."""
    need_chromium()
    from playwright.sync_api import sync_playwright

    import circuits
    from circuits.app_launcher import command

    last = int(circuits.open_study(app_study).steps[-1])
    port = _free_port()
    with serving(command(app_study, port=port), port, "streamlit-graph.log") as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{base}/circuit?step={last}&mode=full")
        page.wait_for_selector(f"{GRAPH} .cg-edge", state="attached", timeout=60_000)  # a vertical path has no width
        settle(page)
        no_traceback(page)
        yield page
        assert not errors, errors
        browser.close()


def test_every_edge_ends_in_an_arrowhead(graph_page):
    edges = graph_page.locator(f"{GRAPH} .cg-edge")
    assert edges.count() > 0
    markers = set(graph_page.locator(f"{GRAPH} marker").evaluate_all("ms => ms.map(m => m.id)"))
    ends = edges.evaluate_all("es => es.map(e => e.getAttribute('marker-end'))")
    assert all(end and end.removeprefix("url(#").removesuffix(")") in markers for end in ends), ends


def test_heads_mark_their_q_k_v_entry_points_where_edges_end(graph_page):
    heads = graph_page.locator(f"{GRAPH} .cg-node.head")
    assert heads.count() > 0
    ports = heads.first.locator(".cg-port").evaluate_all("ps => ps.map(p => p.getAttribute('data-port'))")
    assert ports == ["q", "k", "v"]
    # an edge into a head's port ends on that port's mark (same user-space point)
    ending = graph_page.locator(f"{GRAPH} .cg-edge[data-port='k'], {GRAPH} .cg-edge[data-port='q'], "
                                f"{GRAPH} .cg-edge[data-port='v']").first
    dst, port = ending.get_attribute("data-dst"), ending.get_attribute("data-port")
    end = ending.evaluate("e => { const p = e.getPointAtLength(e.getTotalLength()); return [p.x, p.y]; }")
    mark = graph_page.locator(f"{GRAPH} [data-node='{dst}'] .cg-port[data-port='{port}']")
    centre = [float(mark.get_attribute("cx")), float(mark.get_attribute("cy"))]
    assert end == pytest.approx(centre, abs=0.2)


def test_the_whole_graph_fits_the_screen(graph_page):
    box = graph_page.locator(GRAPH).bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"]
    assert box["x"] + box["width"] <= VIEWPORT["width"]


def test_clicking_a_node_highlights_its_edges_and_dims_the_others(graph_page):
    edge = graph_page.locator(f"{GRAPH} .cg-edge").first
    node = edge.get_attribute("data-dst")
    graph_page.locator(f"{GRAPH} [data-node='{node}'] .shape").click()
    graph_page.wait_for_function(f"() => location.search.includes('node={node}')", timeout=30_000)
    settle(graph_page)
    no_traceback(graph_page)
    assert graph_page.locator(GRAPH).get_attribute("data-selected") == node
    touching = graph_page.locator(f"{GRAPH} .cg-edge[data-src='{node}'], {GRAPH} .cg-edge[data-dst='{node}']")
    others = graph_page.locator(f"{GRAPH} .cg-edge:not([data-src='{node}']):not([data-dst='{node}'])")
    assert touching.count() > 0
    assert all("cg-hl" in c for c in touching.evaluate_all("es => es.map(e => e.getAttribute('class'))"))
    assert all("cg-dim" in c for c in others.evaluate_all("es => es.map(e => e.getAttribute('class'))"))
    assert "selected" in graph_page.locator(f"{GRAPH} [data-node='{node}']").get_attribute("class")
