"""Reading a study while a sweep writes it: no errors, no torn reads, for the whole sweep.

Two readers run in a loop from before the sweep starts until it ends: another process using
the library's API (``open_study``, ``refresh``, patterns, metric, arrays), and a thread of the
test process going through the app's data layer (``app.data``: the cached Study keyed by the
folder's stamp, curves, patterns, arrays). Every value either reads is recorded by a digest
and checked against the finished study: a reader only ever sees complete steps, exactly as
they end up.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from study_helpers import spread

import circuits
from circuits.errors import CircuitsError
from circuits.sweep import sweep

N_STEPS = 5
LAYER, HEAD, EXAMPLE = 1, 2, 5

READER = r"""
import hashlib, json, sys, time, traceback
from pathlib import Path
import numpy as np
import circuits
from circuits.errors import CircuitsError

out, stop, log = Path(sys.argv[1]), Path(sys.argv[2]), open(sys.argv[3], "w")
def digest(a): return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
study, rounds = None, 0
while True:
    last = stop.exists()  # one more full round after the sweep ended
    try:
        if study is None:
            try:
                study = circuits.open_study(out)
            except CircuitsError as err:
                if "not a study" not in str(err) or (out / "study.json").exists():
                    raise
        if study is not None:
            study.refresh()
            steps = list(study.steps)
            for step in steps:
                log.write(json.dumps(["pattern", step, digest(study.pattern(step, 1, 2, 5))]) + "\n")
                log.write(json.dumps(["metric_clean", step, digest(study.array_at(step, "outputs/metric_clean"))]) + "\n")
            if steps:
                log.write(json.dumps(["metric", steps, digest(study.metric())]) + "\n")
                log.write(json.dumps(["heads/induction", steps, digest(study.array("heads/induction"))]) + "\n")
        rounds += 1
    except BaseException:
        log.write(json.dumps(["error", traceback.format_exc()]) + "\n")
        break
    if last:
        break
    time.sleep(0.05)
log.write(json.dumps(["rounds", rounds]) + "\n")
log.close()
"""


def digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def app_reader(out: Path, stop: threading.Event, seen: list, errors: list) -> None:
    """Reads through ``app.data`` as the pages do: stamp, cached Study, cached derived data."""
    from app import data

    path = str(out)
    rounds = 0
    while True:
        last = stop.is_set()
        try:
            stamp = data.stamp(path)
            try:
                study = data._open(path, stamp)
            except CircuitsError as err:
                if "not a study" not in str(err):
                    raise
                study = None
            if study is not None and study.steps:
                steps = [int(s) for s in study.steps]
                curves = data.curves(path, stamp)
                seen.append(("metric", steps, digest(np.asarray(curves["task metric"]))))
                seen.append(("heads/induction", steps, digest(data.array(path, stamp, "heads/induction"))))
                for step in steps:
                    seen.append(("pattern", step, digest(data.pattern(path, stamp, step, LAYER, HEAD, EXAMPLE))))
            rounds += 1
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(repr(err))
            return
        if last:
            seen.append(("rounds", rounds, ""))
            return
        time.sleep(0.05)


def test_api_and_app_read_a_study_while_it_is_written(induction_run, tmp_path):
    out, stop_file, log = tmp_path / "study", tmp_path / "stop", tmp_path / "reader.jsonl"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop_file), str(log)])
    stop = threading.Event()
    seen: list = []
    errors: list = []
    thread = threading.Thread(target=app_reader, args=(out, stop, seen, errors), daemon=True)
    thread.start()
    steps_wanted = spread(induction_run, N_STEPS)
    try:
        time.sleep(1.0)  # the reader process is up before the study exists
        sweep(induction_run, "induction", out, steps=steps_wanted, n_examples=8, batch_size=4, method="none",
              progress=False)
    finally:
        stop_file.touch()
        stop.set()
        reader.wait(timeout=120)
        thread.join(timeout=120)

    final = circuits.open_study(out)
    steps = [int(s) for s in final.steps]
    assert steps == [int(s) for s in steps_wanted.split(",")]
    want_pattern = {s: digest(final.pattern(s, LAYER, HEAD, EXAMPLE)) for s in steps}
    want_metric_clean = {s: digest(final.array_at(s, "outputs/metric_clean")) for s in steps}
    metric, heads = final.metric(), final.array("heads/induction")

    def want_over(kind: str, seen_steps: list[int]) -> str:
        rows = [steps.index(s) for s in seen_steps]
        return digest((metric if kind == "metric" else heads)[rows])

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [r for r in records if r[0] == "error"], [r[1] for r in records if r[0] == "error"]
    assert records[-1][0] == "rounds" and records[-1][1] > 1
    for kind, key, value in (r for r in records if r[0] != "rounds"):
        if kind == "pattern":
            assert value == want_pattern[key], f"torn pattern read at step {key}"
        elif kind == "metric_clean":
            assert value == want_metric_clean[key], f"torn metric read at step {key}"
        else:
            assert key == sorted(key) and value == want_over(kind, key), f"torn {kind} read over steps {key}"
    api_views = {tuple(r[1]) for r in records if r[0] == "metric"}
    assert tuple(steps) in api_views  # it read the finished study too

    assert errors == []
    assert seen and seen[-1][0] == "rounds"
    for kind, key, value in seen[:-1]:
        if kind == "pattern":
            assert value == want_pattern[key], f"app: torn pattern read at step {key}"
        else:
            assert value == want_over(kind, key), f"app: torn {kind} read over steps {key}"
    app_views = {tuple(key) for kind, key, _ in seen if kind == "metric"}
    assert tuple(steps) in app_views
    # Each reader saw the study part-way, and only ever a prefix of the steps (the local executor lands in order).
    assert any(0 < len(v) < len(steps) for v in api_views), f"the API reader never saw the study mid-sweep: {sorted(api_views)}"
    assert any(0 < len(v) < len(steps) for v in app_views), f"the app reader never saw the study mid-sweep: {sorted(app_views)}"
    assert all(list(v) == steps[: len(v)] for v in api_views | app_views)
    print(f"reads during the sweep: API process {len(records)} values over {len(api_views)} study versions, "
          f"app data layer {len(seen)} values over {len(app_views)} versions")
