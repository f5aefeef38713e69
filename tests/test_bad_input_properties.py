"""Bad input campaign (hypothesis): manifests as files, step selections, tasks, study files.

Every bad input must give a CircuitsError of one line naming the problem: never another
exception from inside a library, never a wrong answer. (Mutated manifest *mappings* and step
strings over a fixed schedule are fuzzed in test_manifest.py and test_steps.py; these
extend them to YAML text on disk, random schedules with an oracle, task definitions and the
files of a study.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the codecs for h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import circuits
from circuits import store
from circuits.errors import CircuitsError
from circuits.manifest import Manifest, load_manifest
from circuits.steps import select_steps
from circuits.tasks import Task, metric_per_example

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def one_line(err: CircuitsError) -> str:
    text = str(err)
    assert text and "\n" not in text and len(text) <= 600, text
    assert "Traceback" not in text
    return text


# ---------------------------------------------------------------- manifests as YAML files

VALID_YAML = """name: induction-2l
description: a run
source: local
local:
  path: .
  recipe: induction
  seed: 0
  options: {steps: 600}
architecture: TransformerLensNative
tokens_per_step: 2112
steps: [0, 15, 30, 600]
"""


@st.composite
def mutated_yaml(draw) -> bytes:
    lines = VALID_YAML.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "dup", "edit", "indent", "bytes"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "drop" and len(lines) > 1:
            lines.pop(i)
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "edit":
            key = lines[i].split(":")[0]
            value = draw(st.text(max_size=12) | st.integers().map(str) | st.sampled_from(
                ["[]", "{}", "~", "-1", "[3, 1]", "/etc", "../x", "!!python/object:os.system", "&a [*a]", "'"]))
            lines[i] = f"{key}: {value}\n"
        elif op == "indent":
            lines[i] = "   " + lines[i]
        else:
            lines[i] = draw(st.binary(max_size=12)).decode("latin-1") + lines[i]
    text = "".join(lines).encode("utf-8")
    if draw(st.booleans()) and draw(st.booleans()):
        text = draw(st.binary(max_size=40)) + text[draw(st.integers(0, len(text))):]
    return text


@SETTINGS
@given(text=mutated_yaml())
def test_a_mutated_manifest_file_loads_or_is_refused_in_one_line(tmp_path, text):
    path = tmp_path / "manifest.yaml"
    path.write_bytes(text)
    try:
        manifest = load_manifest(path)
    except CircuitsError as err:
        assert one_line(err).startswith(str(path))
    else:
        assert isinstance(manifest, Manifest) and manifest.origin == str(path)
        assert manifest.steps and manifest.steps == sorted(set(manifest.steps)) and manifest.steps[0] >= 0
        assert manifest.tokens_per_step >= 1
        if manifest.local is not None:
            assert manifest.checkpoint_root.is_relative_to(tmp_path.resolve())


# ---------------------------------------------------------------- step selections

SCHEDULES = st.lists(st.integers(0, 10_000), min_size=1, max_size=30, unique=True).map(sorted)
SPECS = (st.text(max_size=16)
         | st.tuples(st.sampled_from(["all", "every", "log", "first", "last", "range", "", "ALL", " every"]),
                     st.sampled_from([":", "", "::", ": "]),
                     st.text(alphabet="0123456789-:,. x²٣", max_size=10)).map("".join)
         | st.lists(st.integers(-5, 10_005).map(str), min_size=1, max_size=5).map(",".join))


@settings(max_examples=150, deadline=None)
@given(schedule=SCHEDULES, spec=SPECS)
def test_any_selection_over_any_schedule_is_right_or_refused(schedule, spec):
    try:
        chosen = select_steps(spec, schedule)
    except CircuitsError as err:
        assert one_line(err).startswith("step selection")
        return
    assert chosen and chosen == sorted(set(chosen)) and set(chosen) <= set(schedule)
    kind, _, arg = spec.strip().partition(":")
    if spec.strip() == "all":
        assert chosen == schedule
    elif kind in ("first", "last"):
        n = int(arg)
        assert chosen == (schedule[:n] if kind == "first" else schedule[-n:])
    elif kind == "every":
        assert chosen == sorted(set(schedule[:: int(arg)]) | {schedule[-1]})
    elif all(t.strip().lstrip("-").isdecimal() for t in spec.split(",")) and kind not in ("log", "range"):
        assert chosen == sorted({int(t) for t in spec.split(",")})


# ---------------------------------------------------------------- task definitions

D_VOCAB, N_CTX = 16, 8
DTYPES = st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool])


@st.composite
def tensors(draw, batch: int, ndim_hint: int):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([None, [[1, 2]], np.zeros((batch, 2), np.int64), "tokens", 3]))
    ndim = draw(st.sampled_from([ndim_hint] * 4 + [0, 1, 3]))
    shape = [batch if i == 0 and draw(st.integers(0, 4)) else draw(st.integers(0, 4)) for i in range(ndim)]
    values = torch.tensor(draw(st.lists(st.integers(-3, 20), min_size=int(np.prod(shape)),
                                        max_size=int(np.prod(shape)))), dtype=torch.int64).reshape(shape)
    return values.to(draw(DTYPES))


@st.composite
def tasks(draw):
    batch = draw(st.integers(0, 3))
    return {
        "name": draw(st.sampled_from(["t", "my-task"]) | st.text(max_size=6) | st.none()),
        "clean": draw(tensors(batch, 2)), "corrupted": draw(tensors(batch, 2)),
        "answer_pos": draw(tensors(batch, 2)), "correct": draw(tensors(batch, 2)),
        "wrong": draw(st.none() | tensors(batch, 2)),
        "metric": draw(st.sampled_from(["logit_diff", "prob_diff", "kl", "accuracy", ""])),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=tasks())
def test_any_task_definition_works_or_is_refused_in_one_line(fields):
    try:
        task = Task(**fields)
        task.check_fits(D_VOCAB, N_CTX)
    except CircuitsError as err:
        one_line(err)
        return
    # Accepted: every later use works and gives one finite number per example.
    assert task.prompt_hash()
    logits = torch.randn(task.n_examples, task.seq_len, D_VOCAB)
    metric = metric_per_example(logits, task, clean_logits=torch.randn_like(logits))
    assert metric.shape == (task.n_examples,) and torch.isfinite(metric).all()
    half = task.slice(0, max(1, task.n_examples // 2))
    assert half.n_examples == max(1, task.n_examples // 2)


# ---------------------------------------------------------------- study files

STEPS = "0,600"


@pytest.fixture(scope="module")
def studies(induction_run, tmp_path_factory):
    """A small study, and one of the same run with other prompts (seed 1): same shapes, another study."""
    from circuits.sweep import sweep

    root = tmp_path_factory.mktemp("bad-studies")
    run = root / "run"  # the run's first and last checkpoints, as steps 0 and 600
    data = yaml.safe_load((induction_run / "manifest.yaml").read_text())
    for step, source in ((0, data["steps"][0]), (600, data["steps"][-1])):
        shutil.copytree(induction_run / f"step{source}", run / f"step{step}")
    (run / "manifest.yaml").write_text(yaml.safe_dump({**data, "steps": [0, 600]}))
    induction_run = run
    kw = {"steps": STEPS, "n_examples": 4, "batch_size": 4, "method": "none", "progress": False}
    sweep(induction_run, "induction", root / "good", **kw)
    sweep(induction_run, "induction", root / "other", seed=1, **kw)
    return root / "good", root / "other"


SHARD_ATTRS = ["complete", "format", "step", "tokens_seen", "provenance"]
DATASETS = ["patterns", "outputs/metric_clean", "outputs/correct_logits_clean", "heads/induction", "task/clean",
            "activations/blocks.0.hook_resid_post"]
WRONG_VALUES = (st.text(max_size=8).filter(lambda t: "\x00" not in t) | st.floats(allow_nan=True)
                | st.binary(max_size=8).filter(lambda b: b"\x00" not in b)
                | st.lists(st.integers(0, 3), min_size=2, max_size=3).map(np.asarray)
                | st.sampled_from([np.float64(1.5), np.array([True, True]), "{}", "[]", "null", b"\x80\x03"]))
RECORD_FIELDS = ["format", "manifest", "dtype", "keep_logits", "hooks", "task", "task.name", "task.prompt_hash",
                 "task.n_examples", "task.seq_len", "task.arrays", "task.arrays.clean", "model", "model.n_layers",
                 "model.n_heads"]


def wrong_type(value):
    """Values of another JSON type than ``value`` (what a damaged or hand-edited study.json holds)."""
    others = [None, 1.5, "x", [1], {"a": 1}, 7, True]
    return st.sampled_from([o for o in others if type(o) is not type(value)
                            and not (isinstance(value, int) and isinstance(o, int) and not isinstance(o, bool))])


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["truncate", "garbage", "del_attr", "set_attr", "retype", "reshape", "foreign",
                                 "rename", "study_json", "study_json_bytes"]))
    shard = draw(st.sampled_from([0, 600]))
    if kind == "truncate":
        return kind, shard, draw(st.floats(0.0, 0.999))
    if kind == "garbage":
        return kind, shard, (draw(st.integers(0, 95)), draw(st.binary(min_size=1, max_size=64)))  # the superblock
    if kind == "del_attr":
        return kind, shard, draw(st.sampled_from(SHARD_ATTRS))
    if kind == "set_attr":
        return kind, shard, (draw(st.sampled_from(SHARD_ATTRS)), draw(WRONG_VALUES))
    if kind == "retype":  # an analysis result may be any numbers: only a non-numeric one is damage
        name = draw(st.sampled_from(DATASETS))
        dtype = "S4" if name == "heads/induction" else draw(st.sampled_from(["i1", "S4", "?", "u2"]))
        return kind, shard, (name, dtype)
    if kind == "reshape":  # datasets whose shape the study knows
        return kind, shard, draw(st.sampled_from([d for d in DATASETS if d != "heads/induction"]))
    if kind == "study_json":
        return kind, shard, draw(st.sampled_from(RECORD_FIELDS))
    if kind == "study_json_bytes":
        return kind, shard, (draw(st.integers(0, 200)), draw(st.binary(min_size=1, max_size=16)))
    return kind, shard, None


def apply(mutation, out: Path, other: Path, draw_value) -> None:
    kind, step, arg = mutation
    shard = out / store.SHARD_DIR / store.shard_name(step)
    if kind == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: int(len(data) * arg)])
    elif kind == "garbage":
        offset, junk = arg
        with open(shard, "r+b") as f:
            f.seek(offset)
            f.write(junk)
    elif kind in ("del_attr", "set_attr"):
        with h5py.File(shard, "a") as f:
            if kind == "del_attr":
                del f.attrs[arg]
            else:
                f.attrs[arg[0]] = arg[1]
    elif kind in ("retype", "reshape"):
        name = arg[0] if kind == "retype" else arg
        with h5py.File(shard, "a") as f:
            values = f[name][()]
            del f[name]
            if kind == "retype":
                f.create_dataset(name, data=values.astype(arg[1]) if arg[1] != "S4" else values.astype(str).astype("S4"))
            else:
                f.create_dataset(name, data=values.reshape(-1)[1:] if values.size > 1 else np.zeros(3, values.dtype))
    elif kind == "foreign":
        shutil.copy(other / store.SHARD_DIR / shard.name, shard)
    elif kind == "rename":
        other_step = 300 if step == 0 else 0
        shard.replace(out / store.SHARD_DIR / store.shard_name(other_step))
    elif kind == "study_json":
        record = json.loads((out / store.STUDY_FILE).read_text())
        node, parts = record, arg.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = draw_value(wrong_type(node[parts[-1]]))
        (out / store.STUDY_FILE).write_text(json.dumps(record))
    elif kind == "study_json_bytes":
        offset, junk = arg
        data = bytearray((out / store.STUDY_FILE).read_bytes())
        data[offset: offset + len(junk)] = junk
        (out / store.STUDY_FILE).write_bytes(bytes(data))


def attempt(fn):
    try:
        return True, fn()
    except CircuitsError as err:
        one_line(err)
        return False, str(err)


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def exercise(out: Path, good: circuits.store.Study, mutation) -> None:
    """Use every read of the API; each gives the good study's answer or a one-line CircuitsError."""
    ok, study = attempt(lambda: circuits.open_study(out))
    if not ok:
        assert mutation[0].startswith("study_json"), study  # a damaged shard never stops the others
        return
    with study:
        if mutation[0] == "study_json":
            pytest.fail(f"{mutation}: a study.json field of the wrong type was accepted")
        assert set(study.steps) <= set(good.steps)
        for step, problem in study.problems.items():
            assert one_line(CircuitsError(problem)).startswith(str(out / store.SHARD_DIR / store.shard_name(step)))
        rows = [good.steps.index(s) for s in study.steps]
        for step in sorted(set(good.steps) | set(study.problems)):
            for method, args in (("pattern", (step, 1, 2, 3)), ("array_at", (step, "outputs/metric_clean")),
                                 ("activation", (step, "blocks.0.hook_resid_post", 1)),
                                 ("array_at", (step, "heads/induction")), ("shard_provenance", (step,))):
                ok, value = attempt(lambda m=method, a=args: getattr(study, m)(*a))
                if ok:
                    assert step in study.steps
                    expected = getattr(good, method)(*args)
                    assert (value == expected) if isinstance(expected, dict) else same(value, expected), (mutation, step)
        for read, want in ((study.metric, good.metric), (study.loss, good.loss),
                           (lambda: study.array("heads/induction"), lambda: good.array("heads/induction")),
                           (lambda: study.tokens_seen, lambda: good.tokens_seen)):
            ok, value = attempt(read)
            if ok:
                assert same(value, want()[rows]), mutation
        ok, task = attempt(lambda: study.task)
        if ok:
            assert task.prompt_hash() == good.task.prompt_hash()
            assert same(study.tokens(2), good.tokens(2))
        else:
            assert mutation[0] == "study_json_bytes", task
        if mutation[0] != "study_json_bytes":  # the manifest text has no hash: a changed letter is a changed manifest
            assert attempt(lambda: study.manifest)[1].name == good.manifest.name


@SETTINGS
@given(mutation=mutations(), data=st.data())
def test_a_damaged_study_reads_right_or_refuses_in_one_line(studies, tmp_path_factory, mutation, data):
    good_path, other = studies
    out = tmp_path_factory.mktemp("mutant") / "study"
    shutil.copytree(good_path, out)
    apply(mutation, out, other, data.draw)
    with circuits.open_study(good_path) as good:
        exercise(out, good, mutation)
    shutil.rmtree(out.parent)


def test_the_damage_the_campaign_expects_is_named(studies, tmp_path):
    """A few mutations by hand, with the message each must give."""
    good, other = studies
    cases = [
        (("foreign", 600, None), r"step00000600\.h5: a shard of another study \(prompt hash"),
        (("rename", 0, None), r"step00000300\.h5: holds step 0, not the step 300 its name says"),
        (("del_attr", 0, "tokens_seen"), r"step00000000\.h5: damaged shard, attribute 'tokens_seen' is None"),
        (("set_attr", 0, ("provenance", "not json")), r"attribute 'provenance' is not a JSON object"),
        (("retype", 600, ("patterns", "S4")), r"step00000600\.h5: damaged shard, 'patterns' holds \|S4"),
        (("reshape", 600, "outputs/metric_clean"), r"'outputs/metric_clean' is float32 \(3,\), expected float \[4, \.\.\.\]"),
        (("truncate", 0, 0.5), r"step00000000\.h5: corrupted or truncated shard"),
    ]
    for i, (mutation, message) in enumerate(cases):
        out = tmp_path / f"case{i}"
        shutil.copytree(good, out)
        apply(mutation, out, other, None)
        study = circuits.open_study(out)
        assert len(study.problems) == 1, (mutation, study.problems)
        step = next(iter(study.problems))
        with pytest.raises(CircuitsError, match=message):
            study.pattern(step, 0, 0, 0)
    out = tmp_path / "json"
    shutil.copytree(good, out)
    record = json.loads((out / store.STUDY_FILE).read_text())
    record["model"]["n_heads"] = "4"
    (out / store.STUDY_FILE).write_text(json.dumps(record))
    with pytest.raises(CircuitsError, match=r"study\.json: damaged study description, field 'model\.n_heads' is '4', "
                                            r"expected a positive int"):
        circuits.open_study(out)
