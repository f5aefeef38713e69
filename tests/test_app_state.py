"""The app's URL state: parsed leniently (bad values dropped with a note), written back short."""

from __future__ import annotations

import numpy as np

from app.state import (
    Settings,
    gaps_line,
    order_pair,
    snap_choice,
    snap_int,
    snap_node,
    snap_step,
    threshold_default,
    writing_line,
)


def test_round_trip_through_query():
    s = Settings(study="/runs/s", step=135, mode="top-n", threshold=0.5, top_n=20, node="a1.h2", example=3)
    assert Settings.from_query(s.to_query()) == s
    assert Settings().to_query() == {}  # defaults stay out of the URL


def test_bad_values_are_dropped_with_notes():
    s = Settings.from_query({"step": "abc", "threshold": "-1", "mode": "all", "node": "<img src=x>",
                             "example": "-2", "top_n": "7"})
    assert (s.step, s.threshold, s.mode, s.node, s.example, s.top_n) == (None, None, "circuit", None, 0, 7)
    assert len(s.notes) == 5
    assert any("mode" in n for n in s.notes) and any("node" in n for n in s.notes)
    assert Settings.from_query({"threshold": "nan"}).threshold is None


def test_node_names_normalised_and_study_lock():
    assert Settings.from_query({"node": "a0.h1<q>"}).node == "a0.h1"
    assert Settings.from_query({}, default_study="/a").study == "/a"
    assert Settings.from_query({"study": "/b"}, default_study="/a").study == "/b"
    locked = Settings.from_query({"study": "/etc"}, default_study="/a", allow_study=False)
    assert locked.study == "/a" and locked.notes


STEPS = [0, 400, 450, 500, 1000]


def test_step_not_in_the_study_snaps_to_the_nearest_with_a_note():
    assert snap_step(STEPS, 460) == (450, "step 460 is not in this study; showing 450, the nearest")
    assert snap_step(STEPS, 450) == (450, None)
    assert snap_step(STEPS, None) == (1000, None)  # none asked: the last step, nothing to say


def test_step_outside_the_study_says_its_range():
    assert snap_step(STEPS, 99999)[0] == 1000 and "outside this study (steps 0 to 1000)" in snap_step(STEPS, 99999)[1]
    assert snap_step(STEPS, -5) == (0, "step -5 is outside this study (steps 0 to 1000); showing 0, the nearest")


def test_step_with_a_damaged_or_missing_shard_says_so():
    steps = [0, 400, 1000]
    assert snap_step(steps, 500, damaged={500: "cut"}) == (400, "step 500's shard is damaged; showing 400, the nearest")
    assert snap_step(steps, 500, missing={500}) == (400, "step 500's shard is missing; showing 400, the nearest")


def test_numbers_out_of_range_are_clamped_with_a_note():
    assert snap_int("example", 999, 0, 7) == (7, "example 999 is out of range (0 to 7); showing 7")
    assert snap_int("top-n", 0, 1, 40) == (1, "top-n 0 is out of range (1 to 40); showing 1")
    assert snap_int("example", 3, 0, 7) == (3, None)


def test_unknown_node_and_detector_are_replaced_with_a_note():
    assert snap_node("a9.h9", ["a0.h0", "m0"]) == (None, "node a9.h9 is not in this model's graph; no node selected")
    assert snap_node("m0", ["a0.h0", "m0"]) == ("m0", None)
    assert snap_choice("detector", "bogus", ["induction", "copy"])[0] == "induction"
    assert snap_choice("detector", None, ["induction", "copy"]) == ("induction", None)


def test_compare_pair_is_ordered_earlier_first():
    earlier, later, note = order_pair(500, 450)
    assert (earlier, later) == (450, 500) and "comes after" in note
    assert order_pair(450, 500) == (450, 500, None)
    assert "nothing can be added or removed" in order_pair(450, 450)[2]


def test_gaps_name_damaged_and_missing_steps_apart_from_a_running_sweep():
    line = gaps_line([0, 400, 1000], {450: "cut"}, expected=[0, 400, 450, 500, 1000])
    assert line == "Left out: steps 450 (shard damaged), 500 (shard missing); sweep the study again to replace them."
    assert gaps_line([0, 400], {}, expected=[0, 400, 450], writing={450}) is None  # being written: not a gap
    assert gaps_line([0, 400], {}, expected=None) is None  # selection not recorded: nothing called missing
    assert "step 450 now" in writing_line({450}) and writing_line(set()) is None


def test_threshold_default_is_the_stable_circuits_smallest_score():
    scores = np.array([[0.5, -0.2], [0.05, np.nan]])
    stable = np.array([[True, True], [False, False]])
    full = np.array([[True, True], [True, False]])
    assert threshold_default(scores, stable, full) == 0.2
    assert threshold_default(scores, np.zeros((2, 2), bool), full) == 0.05  # no stable circuit here
    assert threshold_default(scores, None, full) == 0.05
    assert threshold_default(scores, None, np.zeros((2, 2), bool)) == 0.0


def test_speed_and_log_axis_round_trip_through_the_url():
    s = Settings(step=450, speed=0.5, log=True)
    assert s.to_query() == {"step": "450", "speed": "0.5", "log": "1"}
    assert Settings.from_query(s.to_query()) == s
    assert Settings.from_query({"log": "true", "speed": "2"}) == Settings(log=True, speed=2.0)


def test_unknown_speed_and_log_values_are_dropped_with_notes():
    s = Settings.from_query({"speed": "3", "log": "sideways"})
    assert (s.speed, s.log) == (Settings().speed, Settings().log)
    assert s.notes == ("ignoring ?speed='3': expected one of 0.5, 1, 2", "ignoring ?log='sideways': expected 1 or 0")
