"""The formation account on the built-in induction run (EAP-IG, the default bootstrap), read
from ``circuits summary --json`` as a user gets it.

What an independent check found on this run: steps 16-25 have no effect to explain (z ~ 2-3,
circuits not reproducible), steps 100-375 a value-path copying circuit, and the induction
mechanism (a0.h* -> a1.h*<k>) forms at 400-450 with the induction scores and the metric jump.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

STEPS = "0,16,25,100,200,300,375,400,425,450,475,500,600,800,1000"
INDUCTION_WINDOW = (400, 500)


@pytest.fixture(scope="module")
def study_dir(induction_run, tmp_path_factory):
    from circuits.sweep import sweep

    out = tmp_path_factory.mktemp("formation") / "study"
    sweep(induction_run, "induction", out, steps=STEPS, hooks="none", method="eap-ig", progress=False)
    return out


@pytest.fixture(scope="module")
def summary(study_dir) -> dict:
    from typer.testing import CliRunner

    from circuits.cli import app

    result = CliRunner().invoke(app, ["summary", str(study_dir), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _k_composition(edge: str) -> bool:
    writer, reader = edge.split("->")
    return writer.startswith("a0.h") and reader.startswith("a1.h") and reader.endswith("<k>")


def test_every_k_composition_edge_of_the_final_stable_circuit_emerges_in_400_500(summary):
    k_edges = [e for e in summary["circuit"]["edge_emergence"] if _k_composition(e["edge"])]
    assert len(k_edges) >= 4, summary["circuit"]["edge_emergence"]
    for e in k_edges:
        assert INDUCTION_WINDOW[0] <= e["step"] <= INDUCTION_WINDOW[1], e


def test_each_layer1_induction_role_forms_in_400_500_and_none_is_dated_earlier(summary):
    induction = {r["head"]: r for r in summary["roles"] if r["kind"] == "induction"}
    assert {f"a1.h{h}" for h in range(4)} <= set(induction), summary["roles"]
    for role in induction.values():
        assert INDUCTION_WINDOW[0] <= role["formed"] <= INDUCTION_WINDOW[1], role


def test_nothing_emerges_where_the_gap_is_not_significant_or_the_circuit_not_reproducible(summary):
    steps, explained = summary["steps"], summary["explained"]
    has = dict(zip(steps, explained["has_circuit"], strict=True))
    assert not has[16] and not has[25]
    for i, step in enumerate(steps):
        if has[step]:
            assert abs(explained["z"][i]) >= 3 and explained["reproducibility"][i] >= 0.6
    emerged = {e["step"] for e in summary["circuit"]["edge_emergence"]}
    assert all(has[s] for s in emerged), emerged


def test_no_flat_detector_gets_a_role(summary):
    for kind, detector in summary["heads"].items():
        curve = detector["top_head_curve"]
        if max(curve) - curve[0] < 0.1:
            assert kind not in {r["kind"] for r in summary["roles"]}, kind
    assert summary["roles"], "the run forms previous-token and induction heads"


def test_the_last_steps_resamples_reproduce_its_circuit(study_dir):
    from circuits.store import open_study

    study = open_study(study_dir)
    assert float(np.mean(study.array_at(study.steps[-1], "circuit/resample_jaccard"))) >= 0.8


def test_an_independent_prompt_set_gives_the_same_stable_circuit(induction_run, study_dir, tmp_path):
    from circuits.store import open_study
    from circuits.sweep import sweep
    from circuits.tracking import jaccard

    first = open_study(study_dir)
    last = first.steps[-1]
    other = sweep(induction_run, "induction", tmp_path / "seed1", steps=str(last), hooks="none", method="eap-ig",
                  seed=1, progress=False)
    assert other.task.prompt_hash() != first.task.prompt_hash()
    assert jaccard(first.array_at(last, "circuit/stable"), other.array_at(last, "circuit/stable")) >= 0.8


def test_epochs_no_circuit_then_value_path_then_k_composition_from_400_450(summary):
    epochs = summary["epochs"]
    assert epochs[0]["has_circuit"] is False and epochs[0]["start"] == summary["steps"][0], epochs
    with_circuit = [e for e in epochs if e["has_circuit"]]
    assert len(with_circuit) >= 2, epochs
    assert not any(_k_composition(a["edge"]) for a in with_circuit[0]["added"])  # value-path copying first
    k_epochs = [e for e in with_circuit if any(_k_composition(a["edge"]) for a in e["added"])]
    assert k_epochs, epochs
    assert 400 <= k_epochs[0]["start"] <= 450, k_epochs[0]


def test_the_metric_jump_has_leading_indicators_before_it(summary):
    metric = [x for x in summary["leading_indicators"] if x["target"] == "metric"]
    assert metric, summary["leading_indicators"]
    for x in metric:
        assert all(ind["lead_steps"] > 0 and ind["onset"] < x["onset"] for ind in x["indicators"])


def test_node_contributions_are_exact_ablations_and_date_each_node_by_its_own_share(summary, study_dir):
    import circuits

    study = circuits.open_study(study_dir)
    assert (np.asarray(study.array("circuit/node_effects_exact")) == 1.0).all()  # 9 writers: exact
    shares, steps = summary["circuit"]["node_shares"], summary["steps"]
    for node in summary["circuit"]["node_emergence"]:
        if node["node"] == "logits":
            continue
        series = np.asarray([np.nan if v is None else v for v in shares[node["node"]]])
        at = steps.index(node["step"])
        assert np.all(series[at:] * np.sign(series[-1]) >= 0.1 * abs(series[-1]) - 1e-9), node
    final_edges = {e["edge"] for e in summary["circuit"]["edge_emergence"]}
    assert set(summary["circuit"]["edge_shares"]) == final_edges
