"""The formation story in a real browser (issue 16, Done when), with every request beyond the
machine blocked: open the landing page (Formation), click the metric's phase window on the
timeline, see the graph jump to that step with its K-composition edges (a0.h* -> a1.h*<k>) ending
at the heads' marked k ports,
select the induction head, see its attention pattern and role; Back returns to the step before,
with the URL and the view agreeing. And Back/Forward on the Circuit page move the slider and
graph, not only the URL.

Expected values come from the study itself, read through the library: the phase step from
``circuits.tracking.track``, the K-composition edges from the stored stable circuit, the head
and its role from the detector scores (``circuits.tracking.material_roles``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from test_app_browser import ARGS, CHROMIUM, GRAPH, no_traceback, server, settle  # noqa: F401 - fixtures
from test_app_offline import _external
from test_app_pages import app_study  # noqa: F401 - the shared study fixture

pytestmark = pytest.mark.slow

K_COMPOSITION = re.compile(r"^a0\.h\d+->a1\.h\d+<k>$")


@pytest.fixture(scope="module")
def offline_page(server):  # noqa: F811
    """A 1400 x 900 page whose requests beyond loopback are aborted and recorded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        pg.attempted = []
        pg.errors = []
        pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))

        def guard(route):
            if _external(route.request.url):
                pg.attempted.append(route.request.url)
                route.abort("blockedbyclient")
            else:
                route.continue_()

        pg.context.route("**/*", guard)
        yield pg
        browser.close()


def _study(path):
    import circuits

    return circuits.open_study(path)


def url_step(pg) -> int | None:
    values = parse_qs(urlsplit(pg.url).query).get("step")
    return int(values[0]) if values else None


def url_node(pg) -> str | None:
    values = parse_qs(urlsplit(pg.url).query).get("node")
    return values[0] if values else None


def graph_step(pg) -> int:
    return int(pg.locator(GRAPH).first.get_attribute("data-step"))


def slider_step(pg) -> int:
    thumb = pg.locator("[data-testid='stSlider'] input[type='range']").first
    return int(thumb.get_attribute("aria-valuetext"))  # a select slider's value is its option index


def drawn_edges(pg) -> set[str]:
    return {e.get_attribute("data-edge") for e in pg.locator(f"{GRAPH} [data-edge]").all()} - {None}


def drawn_ports(pg, edges: set[str]) -> set[str | None]:
    """The port (q, k or v) each drawn edge of ``edges`` ends at, as the SVG marks it."""
    return {pg.locator(f"{GRAPH} [data-edge='{name}']").first.get_attribute("data-port") for name in edges}


def wait_graph_at(pg, step: int) -> None:
    pg.wait_for_function(
        "s => { const f = el => el && el.getAttribute('data-step') === s;"
        " if (f(document.querySelector(\"[data-testid='circuit-graph']\"))) return true;"
        " return [...document.querySelectorAll('*')].map(e => e.shadowRoot).filter(Boolean)"
        ".some(r => f(r.querySelector(\"[data-testid='circuit-graph']\"))); }", arg=str(step), timeout=30_000)
    settle(pg)


def click_lane(pg, lane: str) -> None:
    """Click the middle of the first window of a timeline lane (a plotly bar: its SVG path)."""
    box = pg.evaluate(
        """lane => {
            const gd = document.querySelector("[data-testid='stPlotlyChart'] .js-plotly-plot");
            const bars = gd.data.filter(t => t.type === 'bar');
            const k = bars.findIndex(t => t.y && t.y[0] === lane);
            if (k < 0) return null;
            const path = gd.querySelectorAll('.barlayer .trace')[k].querySelector('.point path');
            const r = path.getBoundingClientRect();
            return {x: r.x + r.width / 2, y: r.y + r.height / 2};
        }""", lane)
    assert box is not None, f"no lane {lane!r} on the timeline"
    pg.mouse.move(box["x"], box["y"])  # plotly selects the hovered point on click
    pg.wait_for_timeout(200)
    pg.mouse.click(box["x"], box["y"])


def k_composition_in_stable_circuit(path, step: int) -> set[str]:
    """The stored stable circuit's K-composition edges at ``step``, named by circuits.graph."""
    from circuits.graph import edge_name, spec_for_study
    from circuits.tracking import explained_of

    s = _study(path)
    i = list(s.steps).index(step)
    spec = spec_for_study(s, s.array("circuit/scores").shape[1:])
    mask = np.asarray(s.array("circuit/stable")[i], dtype=bool)
    explained = explained_of(s)
    assert explained is None or explained.has_circuit[i], f"step {step} has no circuit to explain"
    names = {edge_name(spec.forward_names[r], spec.backward_names[c]) for r, c in zip(*np.nonzero(mask), strict=True)}
    return {n for n in names if K_COMPOSITION.match(n)}


def test_the_formation_story_from_the_timeline_to_the_induction_head_and_back(offline_page, server):  # noqa: F811
    from circuits.tracking import material_roles, track

    base, path = server
    pg = offline_page
    study = _study(path)
    steps = [int(s) for s in study.steps]
    phase = track(study).phases_of("metric")[0]  # the metric's phase change (the induction bump)
    start = steps[steps.index(phase.step) - 1]  # the step before it: where Back must return
    induction = study.array("heads/induction")[-1]
    layer, head = np.unravel_index(int(np.argmax(induction)), induction.shape)
    node = f"a{layer}.h{head}"
    roles = [r for r in material_roles({k.removeprefix("heads/"): np.asarray(study.array(k), float)
                                        for k in study.keys("heads") if k.count("/") == 1}, np.asarray(steps))
             if r.head == node]

    pg.goto(f"{base}/?step={start}")  # the landing page
    pg.wait_for_selector(GRAPH, timeout=60_000)
    settle(pg)
    no_traceback(pg)
    assert graph_step(pg) == start and slider_step(pg) == start

    click_lane(pg, "metric phases")
    wait_graph_at(pg, phase.step)
    assert url_step(pg) == phase.step == slider_step(pg)
    expected = k_composition_in_stable_circuit(path, phase.step)
    assert expected, f"the stable circuit at step {phase.step} has no K-composition edge"
    assert expected <= drawn_edges(pg)
    assert drawn_ports(pg, expected) == {"k"}  # each drawn K-composition edge ends at its head's k port...
    for receiver in {name.split("->")[1].split("<")[0] for name in expected}:  # ...which is marked on the head
        assert pg.locator(f"{GRAPH} [data-node='{receiver}'] .cg-port[data-port='k']").count() == 1

    pg.locator(f"{GRAPH} [data-node='{node}']").click()
    pg.wait_for_selector(f".gtitle:has-text('{node} at step {phase.step}')", timeout=30_000)
    settle(pg)
    assert url_node(pg) == node and url_step(pg) == phase.step
    assert roles, f"the detectors give {node} no material role"
    body = pg.locator("[data-testid='stMain']").inner_text()
    for role in roles:
        assert f"Role: {node} {role.kind.replace('_', ' ')}" in body

    pg.go_back()  # the node selection undone: same step, no node
    wait_graph_at(pg, phase.step)
    assert url_node(pg) is None and url_step(pg) == phase.step == slider_step(pg)
    assert pg.locator(f".gtitle:has-text('{node} at step')").count() == 0
    pg.go_back()  # the step before the click
    wait_graph_at(pg, start)
    assert url_step(pg) == start == graph_step(pg) == slider_step(pg)
    no_traceback(pg)
    assert not pg.errors, pg.errors
    assert not pg.attempted, pg.attempted


def test_back_and_forward_move_the_circuit_pages_step(offline_page, server):  # noqa: F811
    base, path = server
    pg = offline_page
    steps = [int(s) for s in _study(path).steps]
    a, b, c = steps[1:4]
    pg.goto(f"{base}/circuit?step={a}")
    pg.wait_for_selector(GRAPH, timeout=60_000)
    settle(pg)
    for step in (b, c):  # the next-step button, twice: a -> b -> c
        pg.locator(".st-key-circuit-next[data-stale='false'] button").first.click()
        wait_graph_at(pg, step)
        assert url_step(pg) == step == slider_step(pg)
    for step in (b, a):  # Back, twice
        pg.go_back()
        wait_graph_at(pg, step)
        assert url_step(pg) == step == slider_step(pg) == graph_step(pg)
    pg.go_forward()
    wait_graph_at(pg, b)
    assert url_step(pg) == b == slider_step(pg) == graph_step(pg)
    pg.reload()  # a reload shows what the URL says, as the view did before it
    pg.wait_for_selector(GRAPH, timeout=60_000)
    wait_graph_at(pg, b)
    assert slider_step(pg) == b
    no_traceback(pg)
    assert not pg.attempted, pg.attempted


def in_view(pg, selector: str) -> bool:
    """Whether every element matching ``selector`` (at least one) lies inside the 1400 x 900 viewport."""
    return pg.evaluate(
        """sel => { const roots = [document, ...[...document.querySelectorAll('*')].map(e => e.shadowRoot)
                                               .filter(Boolean)];
            const found = roots.flatMap(r => [...r.querySelectorAll(sel)]);
            return found.length > 0 && found.every(el => { const r = el.getBoundingClientRect();
                return r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth; }); }""",
        selector)


def test_play_on_the_landing_page_keeps_timeline_and_graph_in_view(offline_page, server):  # noqa: F811
    base, path = server
    pg = offline_page
    steps = [int(s) for s in _study(path).steps]
    pg.goto(f"{base}/?step={steps[0]}&speed=0.5")
    pg.wait_for_selector(GRAPH, timeout=60_000)
    settle(pg)
    pg.locator(".st-key-formation-play[data-stale='false'] button").first.click()
    seen, out_of_view = [], []
    for _ in range(600):  # each poll: where play is, and whether timeline and graph are on screen
        shown = graph_step(pg)
        if not seen or seen[-1] != shown:
            seen.append(shown)
        # the timeline and every node of the graph (its drawing, not the margin of its box)
        if not (in_view(pg, "[data-testid='stPlotlyChart']") and in_view(pg, f"{GRAPH} [data-node]")):
            out_of_view.append(shown)
        if shown == steps[-1]:
            break
        pg.wait_for_timeout(100)
    assert seen[-1] == steps[-1] and len(seen) >= 3, seen  # played on to the last step
    assert all(step in steps for step in seen) and seen == sorted(seen), seen
    assert not out_of_view, out_of_view
    pg.locator(".st-key-formation-play[data-stale='false'] button").first.wait_for(timeout=30_000)
    no_traceback(pg)
    assert not pg.attempted, pg.attempted
