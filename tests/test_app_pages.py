"""Every page of the app through Streamlit's AppTest, on a real study of the induction run,
and on the bad inputs: no study, an empty study, a study without circuits, a damaged shard.

The study (``app_study``) is swept once per session from the shared ``induction_run``
(steps 0, 400, 450, 500, 1000: before, inside and after the induction phase change).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "app" / "main.py"
STEPS = "0,400,450,500,1000"
PAGES = ("formation", "overview", "circuit", "heads", "compare")


def _shared(tmp_path_factory, worker_id: str) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


@pytest.fixture(scope="session")
def app_study(tmp_path_factory, worker_id, request) -> Path:
    """A study of the built-in induction run: patterns, outputs, EAP circuits, head scores."""
    from circuits.detectors import head_analysis
    from circuits.discovery.analysis import circuit_analysis
    from circuits.sweep import sweep

    if os.environ.get("CIRCUITS_TEST_APP_STUDY"):  # development: reuse a study swept before
        return Path(os.environ["CIRCUITS_TEST_APP_STUDY"])
    induction_run = request.getfixturevalue("induction_run")
    out = _shared(tmp_path_factory, worker_id) / "shared-studies" / "induction-app"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "shards" / "step00001000.h5").exists():
            sweep(induction_run / "manifest.yaml", "induction", out, steps=STEPS, method="eap",
                  analyses=[("circuit", circuit_analysis), ("heads", head_analysis)], progress=False)
    return out


def run_page(study: Path | str | None, page: str | None = "overview", **params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(MAIN), default_timeout=120)
    if study is not None:
        at.query_params["study"] = str(study)
    for key, value in params.items():
        at.query_params[key] = str(value)
    if page is not None:  # None: the landing page (Formation), as a bare URL opens it
        at.switch_page(f"views/{page}.py")
    return at.run()


def texts(at) -> str:
    """Everything the page says in messages and text (errors, warnings, infos, text, captions)."""
    parts = []
    for kind in ("error", "warning", "info", "text", "caption", "markdown"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def charts(at) -> int:
    return len(at.get("plotly_chart"))


def induction_head(study_path: Path) -> str:
    import circuits

    scores = circuits.open_study(study_path).array("heads/induction")[-1]
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return f"a{layer}.h{head}"


# ---------------------------------------------------------------- pages on a real study


def test_overview(app_study):
    at = run_page(app_study)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Run"] == "induction-2l" and metrics["Task"] == "induction"
    assert metrics["Steps in the study"].startswith("5 of")
    assert charts(at) >= 2  # curves with phase windows, circuit evolution
    assert len(at.dataframe) >= 1  # phase table


def test_circuit_slider_graph_and_node(app_study):
    at = run_page(app_study, "circuit", step=0)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    slider = at.select_slider(key="circuit.step")
    assert slider.value == 0 and [int(o) for o in slider.options] == [0, 400, 450, 500, 1000]
    assert at.query_params.get("step") in (None, "0", ["0"])
    slider.set_value(500).run()
    assert_clean(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Step"] == "500"
    assert "Added since step 450" in metrics and "Removed since step 450" in metrics
    assert at.query_params["step"] in ("500", ["500"])
    node = induction_head(app_study)
    at.selectbox(key="circuit.node").set_value(node).run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert at.query_params["node"] in (node, [node])
    assert charts(at) >= 2  # its attention pattern at this step and its detector scores
    at.button(key="circuit.next").click().run()
    assert {m.label: m.value for m in at.metric}["Step"] == "1,000"


def test_circuit_edge_selection_modes(app_study):
    at = run_page(app_study, "circuit", step=1000, mode="top-n", top_n=7)
    assert_clean(at)
    assert at.radio(key="circuit.mode").value == "top-n"
    assert {m.label: m.value for m in at.metric}["Edges drawn"] == "7"
    at.radio(key="circuit.mode").set_value("threshold").run()
    at.number_input(key="circuit.threshold").set_value(1e9).run()
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["Edges drawn"] == "0"
    assert at.query_params["mode"] in ("threshold", ["threshold"])


def test_circuit_play_advances_and_stops(app_study):
    steps = [int(step) for step in STEPS.split(",")]
    at = run_page(app_study, "circuit", step=steps[-1])
    at.button(key="circuit.play").click().run()  # at the end: play restarts from the first step
    assert_clean(at)
    assert at.session_state["circuit.playing"] is True
    seen = [at.select_slider(key="circuit.step").value]
    assert seen[0] in steps[:2]  # restarted (the playing fragment may already have taken one step)
    for _ in range(len(steps)):  # each run of the script is one tick of the playing fragment
        at.run()
        assert_clean(at)
        seen.append(at.select_slider(key="circuit.step").value)
    assert at.session_state["circuit.playing"] is False  # stopped at the last step
    assert seen[-1] == steps[-1]
    assert [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]] == steps[steps.index(seen[0]):]  # every step, in order


def test_heads(app_study):
    at = run_page(app_study, "heads", step=500, node=induction_head(app_study))
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="heads.detector").value == "induction"
    assert "previous token" in at.selectbox(key="heads.detector").options
    assert charts(at) == 3  # heatmap, per-head curves, attention pattern
    at.number_input(key="heads.example").set_value(3).run()
    assert_clean(at)
    assert not at.error


def test_compare(app_study):
    at = run_page(app_study, "compare", step=500)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="compare.a").value == 450 and at.selectbox(key="compare.b").value == 500
    metrics = {m.label: m.value for m in at.metric}
    assert {"Shared edges", "Added by step 500", "Removed by step 500", "Jaccard"} <= set(metrics)
    assert charts(at) == 1  # the step x step Jaccard matrix


def test_bad_url_values_become_notes(app_study):
    at = run_page(app_study, "circuit", step="abc", node="<img src=x onerror=alert(1)>", mode="everything")
    assert_clean(at)
    said = texts(at)
    assert "ignoring" in said and "img" in said  # said, as text
    assert at.select_slider(key="circuit.step").value == 1000  # the last step by default
    assert (url(at, "step"), url(at, "node"), url(at, "mode")) == (None, None, None)  # the URL says what is shown


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("page", PAGES)
def test_no_study_at_path(tmp_path, page):
    at = run_page(tmp_path / "missing **bold** <b>x</b>", page)
    assert_clean(at)
    assert len(at.error) == 1
    message = at.error[0].value
    assert "not a study" in message and "does not exist" in message.replace("\\", "")
    assert "\\*\\*bold\\*\\*" in message and "\\<b\\>" in message  # escaped: shown as typed


@pytest.mark.parametrize("page", PAGES)
def test_no_study_chosen(page):
    at = run_page(None, page)
    assert_clean(at)
    assert "No study selected" in texts(at)


@pytest.fixture(scope="module")
def empty_study(app_study, tmp_path_factory) -> Path:
    """The study's description, no shard landed yet (a sweep just started)."""
    out = tmp_path_factory.mktemp("empty-study")
    shutil.copy(app_study / "study.json", out / "study.json")
    (out / "shards").mkdir()
    return out


@pytest.mark.parametrize("page", PAGES)
def test_empty_study(empty_study, page):
    at = run_page(empty_study, page)
    assert_clean(at)
    assert "no complete steps yet" in texts(at)


def test_new_steps_appear_without_restart(empty_study, app_study, tmp_path):
    study = tmp_path / "growing"
    shutil.copytree(empty_study, study)
    at = run_page(study, "circuit")
    assert "no complete steps yet" in texts(at)
    for name in ("step00000000.h5", "step00000400.h5"):  # shards land (renamed into place)
        shutil.copy(app_study / "shards" / name, study / "shards" / name)
    at.run()
    assert_clean(at)
    assert [int(o) for o in at.select_slider(key="circuit.step").options] == [0, 400]


def _copy_without(study: Path, out: Path, keys: tuple[str, ...]) -> Path:
    """A copy of ``study`` whose shards lack the datasets (or groups) ``keys``."""
    import h5py

    shutil.copytree(study, out)
    for shard in (out / "shards").glob("*.h5"):
        with h5py.File(shard, "a") as f:
            for key in keys:
                del f[key]
    return out


@pytest.fixture(scope="module")
def study_without_circuits(app_study, tmp_path_factory) -> Path:
    return _copy_without(app_study, tmp_path_factory.mktemp("no-circuits") / "study", ("circuit",))


@pytest.mark.parametrize("page", PAGES)
def test_study_without_circuits(study_without_circuits, page):
    at = run_page(study_without_circuits, page)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    if page in ("circuit", "compare"):
        assert "no circuits yet" in texts(at)
    elif page in ("overview", "formation"):
        assert "no circuits yet" in texts(at) and charts(at) >= 1  # curves still shown
    else:
        assert charts(at) == 3  # heads need no circuit


@pytest.fixture(scope="module")
def damaged_study(app_study, tmp_path_factory) -> Path:
    """Shard of step 450 cut in half on disk (a disk fault after it landed)."""
    out = tmp_path_factory.mktemp("damaged") / "study"
    shutil.copytree(app_study, out)
    shard = out / "shards" / "step00000450.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("page", PAGES)
def test_damaged_shard_is_reported_and_the_rest_served(damaged_study, page):
    at = run_page(damaged_study, page, step=500)
    assert_clean(at)
    if page == "overview":
        assert "Step 450: " in _plain(texts(at))  # the reader's reason, under the one line every page gives
        assert {m.label: m.value for m in at.metric}["Steps in the study"].startswith("4 of")
    if page == "circuit":
        assert [int(o) for o in at.select_slider(key="circuit.step").options] == [0, 400, 500, 1000]
        assert "Added since step 400" in {m.label for m in at.metric}
    else:
        assert charts(at) >= 1


def test_garbage_study_json(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"format": "not a study"}))
    for page in PAGES:
        at = run_page(tmp_path, page)
        assert_clean(at)
        assert at.error, page


# ---------------------------------------------------------------- text from files stays text


def test_labels_from_files_are_escaped():
    from app import charts as app_charts
    from app import ui

    fig = app_charts.attention_heatmap(np.eye(2), ["<b>x</b>", "**y**"], "t")
    assert list(fig.data[0].x) == ["0: &lt;b&gt;x&lt;/b&gt;", "1: **y**"]
    assert ui.md("[link](javascript:x) <script>") == "\\[link\\]\\(javascript\\:x\\) \\<script\\>"


# ---------------------------------------------------------------- the formation account


def _study_arrays(study_path: Path) -> dict:
    """What the library says of the study: stable and full-data circuit sizes, which steps have a circuit."""
    import circuits
    from circuits.tracking import track

    study = circuits.open_study(study_path)
    has = track(study).explained.has_circuit
    return {"steps": [int(s) for s in study.steps], "has": [bool(h) for h in has],
            "stable": study.array("circuit/stable").reshape(len(has), -1).sum(1),
            "full": study.array("circuit/in_circuit").reshape(len(has), -1).sum(1)}


def frame(at, *columns: str, index: int = 0):
    """The ``index``-th table on the page holding all of ``columns`` (AppTest gives tables no key)."""
    found = [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)]
    assert len(found) > index, (columns, [list(d.value.columns) for d in at.dataframe])
    return found[index]


def _plain(text: str) -> str:
    return text.replace("\\", "")  # markdown escapes off: the words as shown


def test_circuit_shows_the_stable_circuit_by_default(app_study):
    facts = _study_arrays(app_study)
    last = facts["steps"][-1]
    assert facts["has"][-1] and facts["stable"][-1] != facts["full"][-1]  # the two circuits differ here
    at = run_page(app_study, "circuit", step=last)
    assert_clean(at)
    assert at.radio(key="circuit.mode").value == "circuit"
    assert {m.label: m.value for m in at.metric}["Edges drawn"] == str(facts["stable"][-1])
    said = _plain(texts(at))
    assert f"Step {last}: a circuit to explain: gap" in said and "Stable circuit: the edges in >= 80% of 20" in said
    table = frame(at, "stable circuit", "full-data circuit")
    assert len(table) == facts["stable"][-1]
    assert {"score", "+- se", "in resamples", "stable circuit", "full-data circuit"} <= set(table.columns)
    assert table["stable circuit"].all() and (table["in resamples"] >= 0.8 - 1e-6).all() and (table["+- se"] > 0).all()
    at.radio(key="circuit.mode").set_value("full").run()  # the full-data circuit stays a choice
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["Edges drawn"] == str(facts["full"][-1])
    assert at.query_params["mode"] in ("full", ["full"])


def test_circuit_at_a_step_without_a_circuit(app_study):
    facts = _study_arrays(app_study)
    step = facts["steps"][facts["has"].index(False)]  # step 0: no effect to explain yet
    at = run_page(app_study, "circuit", step=step)
    assert_clean(at)
    info = _plain(" ".join(str(i.value) for i in at.info))
    assert f"Step {step}: no circuit yet: gap" in info and "+- " in info and "(z " in info
    assert "reproducibility" in info and "below the rule (|z|" in info
    assert {m.label: m.value for m in at.metric}["Edges drawn"] == "0"
    at.radio(key="circuit.mode").set_value("top-n").run()  # the scores are still there
    at.number_input(key="circuit.top_n").set_value(5).run()
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["Edges drawn"] == "5"
    assert "no circuit yet" in _plain(texts(at))  # still said under another selection


def test_circuit_trust_line_at_a_checked_step(app_study):
    at = run_page(app_study, "circuit", step=1000)
    assert_clean(at)
    said = _plain(texts(at))
    assert "step 1000: EAP vs exact: rho " in said and " signed, " in said and " on |score|, top-10 overlap " in said
    assert not at.warning  # not poor on this study


def test_circuit_node_roles(app_study):
    node = induction_head(app_study)
    at = run_page(app_study, "circuit", step=1000, node=node)
    assert_clean(at)
    roles = [c for c in _plain(texts(at)).splitlines() if c.startswith("Role: ")]
    assert any(line.startswith(f"Role: {node} induction: ") and "formed at step" in line for line in roles), roles
    at = run_page(app_study, "circuit", step=1000, node="a0.h3")  # no material role
    assert_clean(at)
    assert "No material detector role" in texts(at)


def test_overview_formation_account(app_study):
    at = run_page(app_study)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    facts = _study_arrays(app_study)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Steps with a circuit"] == f"{sum(facts['has'])} of {len(facts['has'])}"
    assert metrics["First circuit at step"] == f"{facts['steps'][facts['has'].index(True)]:,}"
    assert charts(at) >= 3  # formation timeline, curves, circuit evolution
    epochs = frame(at, "epoch", "similarity >=")
    assert list(epochs["epoch"])[0] == "E1 no circuit yet" and list(epochs["circuit"])[:2] == ["no", "yes"]
    assert list(epochs["added"])[1] == list(epochs["edges"])[1]  # the first circuit: every edge is new
    changes = frame(at, "edge", "change", index=int((epochs["added"] + epochs["dropped"] > 0).sum()) - 1)
    assert "added" in set(changes["change"]) and any("<k>" in e for e in changes["edge"])  # K-composition comes last
    steps = frame(at, "share of largest gap")
    assert list(steps["circuit"]) == ["yes" if h else "no" for h in facts["has"]]
    assert steps["share of largest gap"].max() == pytest.approx(1.0)
    said = _plain(texts(at))
    assert "how far to trust EAP (against exact patching at 5 step(s)" in said
    assert "step 1000: EAP vs exact: rho" in said
    assert "metric rise at step" in said and "started earlier" in said  # leading indicators per phase change


@pytest.fixture(scope="module")
def poor_study(app_study, tmp_path_factory) -> Path:
    """The study with step 1000's trust check marked poor (as a misranking method would leave it)."""
    import h5py

    from circuits.discovery.trust import TRUST_FIELDS

    out = tmp_path_factory.mktemp("poor") / "study"
    shutil.copytree(app_study, out)
    with h5py.File(out / "shards" / "step00001000.h5", "a") as f:
        trust = f["circuit/trust"][...]
        trust[TRUST_FIELDS.index("poor")] = 1.0
        f["circuit/trust"][...] = trust
    return out


@pytest.mark.parametrize("page", ("overview", "circuit"))
def test_poor_trust_warns_with_remedies(poor_study, page):
    at = run_page(poor_study, page, step=1000)
    assert_clean(at)
    warning = _plain(" ".join(str(w.value) for w in at.warning))
    assert "poor at step(s) 1000" in warning and "--ig-steps 30" in warning and "--method patching" in warning
    if page == "circuit":
        assert "step 1000: EAP vs exact: rho" in warning and "POOR" in warning


def test_heads_role_lines_only_where_material(app_study):
    at = run_page(app_study, "heads", step=1000)
    assert_clean(at)
    roles = [c for c in _plain(texts(at)).splitlines() if c.startswith("Role: ")]
    assert roles and all(" induction: " in line for line in roles)
    assert any("in the stable circuit from step" in line for line in roles)
    at.selectbox(key="heads.detector").set_value("duplicate_token").run()  # a flat detector: no role
    assert_clean(at)
    if "duplicate token" not in {r.split(" ", 2)[2].split(":")[0] for r in roles}:
        assert "No head takes the duplicate token role" in texts(at)


def test_compare_uses_the_stable_circuit(app_study):
    facts = _study_arrays(app_study)
    at = run_page(app_study, "compare", step=facts["steps"][1])
    assert_clean(at)
    assert "Comparing the stable circuit" in texts(at)
    info = _plain(" ".join(str(i.value) for i in at.info))
    assert f"Step {facts['steps'][0]}: no circuit yet" in info
    metrics = {m.label: m.value for m in at.metric}
    assert metrics[f"Added by step {facts['steps'][1]}"] == str(facts["stable"][1])  # from nothing


# ---------------------------------------------------------------- older studies


@pytest.fixture(scope="module")
def older_study(app_study, tmp_path_factory) -> Path:
    """The study's description as an older circuits wrote it (before the bootstrap and trust arrays)."""
    out = tmp_path_factory.mktemp("older") / "study"
    shutil.copytree(app_study, out)
    record = json.loads((out / "study.json").read_text())
    record["format"] = "circuits-study/4"
    (out / "study.json").write_text(json.dumps(record))
    return out


@pytest.mark.parametrize("page", PAGES)
def test_older_study_gets_the_librarys_line(older_study, page):
    at = run_page(older_study, page)
    assert_clean(at)
    assert len(at.error) == 1
    message = _plain(at.error[0].value)
    assert "a study of another circuits version (format 'circuits-study/4'" in message
    assert "sweep again into a new folder" in message


@pytest.fixture(scope="module")
def study_without_bootstrap(app_study, tmp_path_factory) -> Path:
    """Circuits without the bootstrap arrays (an analysis of its own, say): the full-data circuit stands in."""
    keys = tuple(f"circuit/{k}" for k in ("stable", "stable_faithfulness", "inclusion", "score_se", "resample_jaccard",
                                          "trust"))
    return _copy_without(app_study, tmp_path_factory.mktemp("no-bootstrap") / "study", keys)


@pytest.mark.parametrize("page", PAGES)
def test_study_without_bootstrap(study_without_bootstrap, page):
    at = run_page(study_without_bootstrap, page, step=1000)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    if page == "circuit":
        assert "no stable circuit" in texts(at)
        table = frame(at, "full-data circuit")
        assert "stable circuit" not in table.columns and table["in resamples"].isna().all()


# ---------------------------------------------------------------- URL values corrected, with a note


def notes(at) -> str:
    """The one-line notes (st.info) the page gives, markdown escapes off."""
    return "\n".join(_plain(str(e.value)) for e in at.info)


def url(at, key: str) -> str | None:
    value = at.query_params.get(key)
    return value[0] if isinstance(value, list) else value


def test_step_not_in_the_study_is_corrected_in_the_url_with_a_note(app_study):
    at = run_page(app_study, "circuit", step=460)
    assert_clean(at)
    assert at.select_slider(key="circuit.step").value == 450
    assert url(at, "step") == "450"
    assert "step 460 is not in this study; showing 450, the nearest" in notes(at)


@pytest.mark.parametrize(("asked", "shown"), [(99999, 1000), (-5, 0)])
def test_step_outside_the_study_is_corrected_in_the_url_with_a_note(app_study, asked, shown):
    at = run_page(app_study, "heads", step=asked)
    assert_clean(at)
    assert at.select_slider(key="heads.step").value == shown and url(at, "step") == str(shown)
    assert f"step {asked} is outside this study (steps 0 to 1000); showing {shown}, the nearest" in notes(at)


def test_example_out_of_range_is_corrected_in_the_url_with_a_note(app_study):
    at = run_page(app_study, "heads", example=999)
    assert_clean(at)
    last = int(at.number_input(key="heads.example").max)
    assert at.number_input(key="heads.example").value == last and url(at, "example") == str(last)
    assert f"example 999 is out of range (0 to {last}); showing {last}" in notes(at)


@pytest.mark.parametrize("page", ["circuit", "heads"])
def test_node_not_in_the_model_is_dropped_from_the_url_with_a_note(app_study, page):
    at = run_page(app_study, page, node="a9.h9")
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert url(at, "node") is None
    assert "node a9.h9 is not in this model" in notes(at)


def test_top_n_out_of_range_is_corrected_and_its_limits_named(app_study):
    at = run_page(app_study, "circuit", mode="top-n", top_n=100000)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    box = at.number_input(key="circuit.top_n")
    n_edges = int(box.max)
    assert box.value == n_edges and url(at, "top_n") == str(n_edges)
    assert box.label == f"Top n edges (1 to {n_edges})"
    assert f"top-n 100000 is out of range (1 to {n_edges}); showing {n_edges}" in notes(at)


def test_unknown_detector_is_corrected_in_the_url_with_a_note(app_study):
    at = run_page(app_study, "heads", detector="bogus")
    assert_clean(at)
    assert at.selectbox(key="heads.detector").value == "induction" and url(at, "detector") == "induction"
    assert "detector 'bogus' is not in this study" in notes(at)


def test_threshold_default_is_the_stable_circuits_smallest_score(app_study):
    import circuits

    study = circuits.open_study(app_study)
    scores, stable = study.array("circuit/scores")[-1], study.array("circuit/stable")[-1].astype(bool)
    smallest = float(np.abs(scores[stable]).min())
    at = run_page(app_study, "circuit", step=1000, mode="threshold")
    assert_clean(at)
    assert at.number_input(key="circuit.threshold").value == pytest.approx(smallest, rel=1e-5)
    drawn = int({m.label: m.value for m in at.metric}["Edges drawn"])
    assert drawn >= int(stable.sum())  # every stable-circuit edge is drawn, not every edge


def test_compare_with_the_later_step_first_is_ordered_with_a_note(app_study):
    at = run_page(app_study, "compare", base=500, step=450)
    assert_clean(at)
    assert at.selectbox(key="compare.a").value == 450 and at.selectbox(key="compare.b").value == 500
    assert (url(at, "base"), url(at, "step")) == ("450", "500")
    assert "step 500 comes after step 450: comparing 450 (earlier) with 500 (later)" in notes(at)


@pytest.fixture(scope="module")
def deleted_study(app_study, tmp_path_factory) -> Path:
    """Step 500's shard deleted from a study whose record names the steps its sweep selected."""
    out = tmp_path_factory.mktemp("deleted") / "study"
    shutil.copytree(app_study, out)
    record = json.loads((out / "study.json").read_text())
    record["steps"] = [int(x) for x in STEPS.split(",")]
    (out / "study.json").write_text(json.dumps(record))
    (out / "shards" / "step00000500.h5").unlink()
    return out


def _opened_cleanly(study, page: str):
    at = run_page(study, page)
    assert_clean(at)
    return at


def _warnings(at) -> list[str]:
    return [_plain(str(w.value)) for w in at.warning]


@pytest.mark.parametrize("page", PAGES)
def test_deleted_shard_is_named_on_every_page(deleted_study, page):
    at = _opened_cleanly(deleted_study, page)
    assert "Left out: step 500 (shard missing); sweep the study again to replace it." in _warnings(at)
    assert "A sweep is writing" not in _plain(texts(at))  # not taken for a sweep still running
    if page == "overview":
        assert {m.label: m.value for m in at.metric}["Steps in the study"] == "4 of 5"


def test_deleted_shard_asked_for_is_corrected_with_a_note(deleted_study):
    at = run_page(deleted_study, "circuit", step=500)
    assert_clean(at)
    assert at.select_slider(key="circuit.step").value == 450 and url(at, "step") == "450"
    assert "step 500's shard is missing; showing 450, the nearest" in notes(at)


@pytest.mark.parametrize("page", PAGES)
def test_truncated_shard_is_named_on_every_page(damaged_study, page):
    at = _opened_cleanly(damaged_study, page)
    assert "Left out: step 450 (shard damaged); sweep the study again to replace it." in _warnings(at)


def test_truncated_shard_asked_for_is_corrected_with_a_note(damaged_study):
    at = run_page(damaged_study, "circuit", step=450)
    assert_clean(at)
    assert at.select_slider(key="circuit.step").value == 400 and url(at, "step") == "400"
    assert "step 450's shard is damaged; showing 400, the nearest" in notes(at)


# ---------------------------------------------------------------- Formation, the landing page


def test_formation_is_the_landing_page(app_study):
    at = run_page(app_study, None)
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert [h.value for h in at.subheader][:1] == ["Formation"]
    assert at.select_slider(key="formation.step").value == 1000  # no step asked: the last
    assert charts(at) == 1  # the timeline (the graph is a component)
    assert "a circuit to explain" in texts(at)  # the step's line, from the library's rule


def test_formation_timeline_has_a_lane_for_every_phase_list_and_the_epochs(app_study):
    import circuits
    from app import formation
    from circuits.tracking import track

    at = run_page(app_study, "formation")
    tracked = track(circuits.open_study(app_study))
    lanes = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    drawn = {t["y"][0] for t in lanes if t.get("type") == "bar"}
    curves = {p.curve for p in tracked.phases}
    assert drawn == {f"{formation.curve_title(c)} phases" for c in curves} | {"mechanism epochs"}


def test_formation_node_shows_its_pattern_and_roles(app_study):
    node = induction_head(app_study)
    at = run_page(app_study, "formation", step=500, node=node)
    assert_clean(at)
    assert at.selectbox(key="formation.node").value == node
    assert charts(at) == 2  # the timeline and the head's attention pattern at step 500
    assert f"Role: {node} induction" in _plain(texts(at))


def test_formation_play_advances_and_stops(app_study):
    steps = [int(step) for step in STEPS.split(",")]
    at = run_page(app_study, "formation", step=steps[-1])
    at.button(key="formation.play").click().run()  # at the end: play restarts from the first step
    assert_clean(at)
    assert url(at, "step") in {str(s) for s in steps[:2]}
    for _ in range(len(steps)):
        at.run()
        assert_clean(at)
    assert at.session_state["formation.playing"] is False and at.select_slider(key="formation.step").value == steps[-1]
    assert url(at, "step") == str(steps[-1])


def test_formation_log_axis_and_speed_live_in_the_url(app_study):
    at = run_page(app_study, "formation", log=1, speed=2)
    assert_clean(at)
    assert at.toggle(key="formation.log").value is True
    assert at.selectbox(key="formation.speed").value == 2.0
    assert json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["xaxis"]["type"] == "log"
    at.toggle(key="formation.log").set_value(False).run()
    assert url(at, "log") is None  # linear is the default, left out of the URL
    at.selectbox(key="formation.speed").set_value(0.5).run()
    assert url(at, "speed") == "0.5"


def test_formation_corrects_url_values_with_a_note(app_study):
    at = run_page(app_study, "formation", step=460, log="sideways", speed=3)
    assert_clean(at)
    assert at.select_slider(key="formation.step").value == 450 and url(at, "step") == "450"
    assert "step 460 is not in this study; showing 450, the nearest" in notes(at)
    said = _plain(texts(at))
    assert "ignoring ?log='sideways'" in said and "ignoring ?speed='3'" in said
    assert url(at, "log") is None and url(at, "speed") is None  # dropped from the URL too: it says what is shown


# ---------------------------------------------------------------- the URL leads (Back/Forward, edited links)
# AppTest's query parameters changed between runs are what the browser sends after Back/Forward
# (Streamlit reruns the page with the URL it returns to).


def back_to(at, **params):
    for key, value in params.items():
        if value is None:
            del at.query_params[key]
        else:
            at.query_params[key] = str(value)
    return at.run()


def test_circuit_page_follows_the_url_when_it_changes_outside_the_app(app_study):
    at = run_page(app_study, "circuit", step=400)
    at.select_slider(key="circuit.step").set_value(450).run()
    at.radio(key="circuit.mode").set_value("top-n").run()
    assert url(at, "step") == "450" and url(at, "mode") == "top-n"
    back_to(at, step=400, mode=None, node="a1.h1", speed=2)
    assert_clean(at)
    assert at.select_slider(key="circuit.step").value == 400
    assert {m.label: m.value for m in at.metric}["Step"] == "400"
    assert at.radio(key="circuit.mode").value == "circuit"
    assert at.selectbox(key="circuit.node").value == "a1.h1"
    assert at.selectbox(key="circuit.speed").value == 2.0


def test_formation_page_follows_the_url_when_it_changes_outside_the_app(app_study):
    at = run_page(app_study, "formation", step=400)
    at.select_slider(key="formation.step").set_value(500).run()
    assert url(at, "step") == "500"
    back_to(at, step=400, log=1)
    assert_clean(at)
    assert at.select_slider(key="formation.step").value == 400 and at.toggle(key="formation.log").value is True


def test_heads_page_follows_the_url_and_writes_its_controls_to_it(app_study):
    at = run_page(app_study, "heads", step=400, node="a1.h2", example=3)
    assert_clean(at)
    assert (at.select_slider(key="heads.step").value, at.number_input(key="heads.layer").value,
            at.number_input(key="heads.head").value, at.number_input(key="heads.example").value) == (400, 1, 2, 3)
    at.number_input(key="heads.head").set_value(0).run()
    assert url(at, "node") == "a1.h0"
    at.select_slider(key="heads.step").set_value(1000).run()
    assert url(at, "step") == "1000"
    detectors = at.selectbox(key="heads.detector").options
    back_to(at, step=450, node="a0.h3", detector=detectors[-1])
    assert (at.select_slider(key="heads.step").value, at.number_input(key="heads.layer").value,
            at.number_input(key="heads.head").value) == (450, 0, 3)
    assert at.selectbox(key="heads.detector").value == detectors[-1]


def test_compare_page_follows_the_url_pair(app_study):
    at = run_page(app_study, "compare", base=400, step=500)
    at.selectbox(key="compare.b").set_value(1000).run()
    assert (url(at, "base"), url(at, "step")) == ("400", "1000")
    back_to(at, base=0, step=450)
    assert (at.selectbox(key="compare.a").value, at.selectbox(key="compare.b").value) == (0, 450)
