"""Task files (circuits/task_files.py): JSONL and CSV rows read with a tiny word-level tokenizer,
right padding (exact for causal models: a padded row scores as that row alone), bad input in
one line, and an end-to-end sweep of EAP-IG's IOI CSV and a JSONL of text prompts.

Expected tokens come from the tokenizer itself, expected metrics from softmax written here.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_tokenizers import word_level_tokenizer

from circuits.discovery.scoring import score_edges, score_edges_per_example
from circuits.errors import CircuitsError
from circuits.task_files import load_task_file
from circuits.tasks import PAD, metric_per_example

NAMES = ("Mary", "John", "Anne", "Paul", "Eve", "Tom")
SENTENCES = (
    "When Mary and John went to the store , John gave a drink to",
    "Then , Anne and Paul had a long argument , and afterwards Paul said to",
    "The war lasted from the year 1732 to the year 17",
)


def _tokenizer():
    return word_level_tokenizer([*NAMES, *(f"{yy:02d}" for yy in range(100))], SENTENCES)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-checkpoint local run: a tiny GPTNeoX (rotary) with its word-level tokenizer in step0/."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from circuits.manifest import parse_manifest

    run = tmp_path_factory.mktemp("word-run")
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(run / "step0")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).eval().save_pretrained(run / "step0")
    manifest = parse_manifest({"name": "word-run", "source": "local", "local": {"path": "."},
                               "tokens_per_step": 1, "steps": [0]})
    (run / "manifest.yaml").write_text(manifest.to_yaml())
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    import circuits

    return circuits.load(run_dir, 0)


def _ids(model, text: str) -> list[int]:
    return list(model.tokenizer.encode(text, add_special_tokens=False))


def _one(model, text: str) -> int:
    (token,) = _ids(model, text)
    return token


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


IOI_ROWS = [  # EAP-IG's IOI layout (ioi_llama.csv): an unnamed index, clean, corrupted, corrupted_hard, ids
    ("When Mary and John went to the store , John gave a drink to",
     "When Mary and John went to the store , Eve gave a drink to", "Mary", "John"),
    ("Then , Anne and Paul had a long argument , and afterwards Paul said to",
     "Then , Anne and Paul had a long argument , and afterwards Tom said to", "Anne", "Paul"),
    ("When Paul and Eve went to the store , Eve gave a drink to",
     "When Paul and Eve went to the store , Mary gave a drink to", "Paul", "Eve"),
]


def _ioi_csv(path: Path, model) -> Path:
    lines = [f'{i},"{clean}","{corrupt}","{clean}",{_one(model, io)},{_one(model, s)}'
             for i, (clean, corrupt, io, s) in enumerate(IOI_ROWS)]
    return _write_csv(path, ",clean,corrupted,corrupted_hard,correct_idx,incorrect_idx", lines)


# ---------------------------------------------------------------- reading


def test_eap_ig_ioi_csv_reads_as_it_is(tmp_path, model):
    task = load_task_file(_ioi_csv(tmp_path / "ioi.csv", model), model)
    assert task.name == "ioi" and task.metric == "logit_diff" and task.n_examples == 3
    lengths = [len(_ids(model, clean)) for clean, *_ in IOI_ROWS]
    assert task.lengths.tolist() == lengths and task.seq_len == max(lengths) and task.is_padded
    for row, (clean, corrupt, io, s) in enumerate(IOI_ROWS):
        n = lengths[row]
        assert task.clean[row, :n].tolist() == _ids(model, clean)
        assert task.corrupted[row, :n].tolist() == _ids(model, corrupt)
        assert task.answer_pos[row].tolist() == [n - 1]  # the last real token, not the last position
        assert task.correct[row].tolist() == [_one(model, io)] and task.wrong[row].tolist() == [_one(model, s)]
    assert task.prompts[0] == IOI_ROWS[0][0]


def test_greater_than_csv_label_is_prob_diff_over_years_above_and_below(tmp_path, model):
    rows = ["The war lasted from the year 1732 to the year 17,The war lasted from the year 1701 to the year 17,32",
            "The war lasted from the year 1704 to the year 17,The war lasted from the year 1701 to the year 17,4"]
    task = load_task_file(_write_csv(tmp_path / "gt.csv", "clean,corrupted,label", rows), model)
    assert task.metric == "prob_diff" and task.correct.shape == (2, 1, 95) and task.wrong.shape == (2, 1, 33)
    years = [_one(model, f"{yy:02d}") for yy in range(100)]
    assert [t for t in task.correct[0, 0].tolist() if t != PAD] == years[33:]
    assert [t for t in task.wrong[0, 0].tolist() if t != PAD] == years[:33]
    assert [t for t in task.wrong[1, 0].tolist() if t != PAD] == years[:5]
    logits = torch.randn(2, task.seq_len, len(model.tokenizer), generator=torch.Generator().manual_seed(0))
    probs = logits[:, -1].softmax(-1)  # both prompts have the same length: the answer is at the end
    want = [probs[0, years[33:]].sum() - probs[0, years[:33]].sum(), probs[1, years[5:]].sum() - probs[1, years[:5]].sum()]
    np.testing.assert_allclose(metric_per_example(logits, task).numpy(), want, rtol=1e-5)


def test_jsonl_text_and_token_ids_with_answer_sets_and_several_positions(tmp_path, model):
    mary, john, anne, paul = (_one(model, n) for n in ("Mary", "John", "Anne", "Paul"))
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"clean": IOI_ROWS[0][0], "corrupted": IOI_ROWS[0][1], "correct": " Mary", "wrong": [" John", " Eve"]},
        "",  # blank lines are skipped
        {"clean": [mary, john, anne], "corrupted": [paul, john, anne], "answer_pos": [0, -1],
         "correct": [[anne, paul], john], "wrong": [mary, [mary, paul]]},
    ])
    task = load_task_file(path, model, metric="logit_diff_max")
    n0 = len(_ids(model, IOI_ROWS[0][0]))
    assert task.lengths.tolist() == [n0, 3] and task.metric == "logit_diff_max"
    assert task.answer_pos.tolist() == [[n0 - 1, n0 - 1], [0, 2]]  # example 0: its second slot is padding
    assert task.correct.tolist() == [[[mary, PAD], [PAD, PAD]], [[anne, paul], [john, PAD]]]
    assert task.wrong.tolist() == [[[john, _one(model, "Eve")], [PAD, PAD]], [[mary, PAD], [mary, paul]]]
    assert task.clean[1].tolist() == [mary, john, anne] + [task.options["pad_id"]] * (n0 - 3)
    assert task.prompts == (IOI_ROWS[0][0], "")


def test_a_file_may_name_its_metric_and_take_its_first_rows(tmp_path, model):
    rows = [{"clean": [1, 2, 3], "corrupted": [4, 2, 3], "correct": 5, "metric": "logprob"}] * 3
    task = load_task_file(_write_jsonl(tmp_path / "lp.jsonl", rows), model, n_examples=2)
    assert task.metric == "logprob" and task.n_examples == 2 and task.lengths is None and task.wrong is None


# ---------------------------------------------------------------- bad input: one line naming file, row, field


@pytest.mark.parametrize(("name", "content", "pattern"), [
    ("a.jsonl", ['{"clean": "When Mary and John went to the store , John gave a drink to", '
                 '"corrupted": "When Mary went to the store , John gave a drink to", "correct": " Mary"}'],
     r"a.jsonl, row 1, field 'corrupted': 12 tokens, the clean prompt 14; clean and corrupted prompts must have "
     r"the same length"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "correct": 4}', "{not json"], r"a.jsonl, row 2: not JSON"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "corect": 4}'],
     r"row 1, field 'corect': unknown field; expected clean, corrupted, correct"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2]}'], r"row 1, field 'correct': missing"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "correct": "Mary John"}'],
     r"row 1, field 'correct': answer 'Mary John' is 2 tokens for this tokenizer; an answer must be one token"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 99999], "correct": 4}'],
     r"row 1, field 'corrupted': token id 99999 outside the model's vocabulary 0\.\.\d+"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "correct": 4, "answer_pos": 2}'],
     r"row 1, field 'answer_pos': 2 is outside the prompt's 2 tokens"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "correct": [4, 4], "answer_pos": [0, 1], "wrong": 5}'],
     r"row 1, field 'wrong': with answer_pos a list of 2 positions, expected a list of 2 answers"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "correct": 4, "metric": "kl"}',
                 '{"clean": [1, 2], "corrupted": [3, 2], "correct": 4, "metric": "prob_diff"}'],
     r"row 2, field 'metric': 'prob_diff', an earlier row names 'kl'"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "correct": 4, "wrong": 5}',
                 '{"clean": [1, 2], "corrupted": [3, 2], "correct": 4}'],
     r"row 2, field 'wrong': missing, while an earlier row gives some"),
    ("a.jsonl", ['{"clean": [1, 2], "corrupted": [3, 2], "correct": 4, "metric": "accuracy"}'],
     r"a.jsonl: metric 'accuracy' unknown"),
    ("a.jsonl", [], r"a.jsonl: no rows"),
    ("b.csv", ["clean,corrupted,correct_idx", "a,b,3"],
     r"b.csv: column correct_idx without incorrect_idx: .* rename it label"),
    ("b.csv", ["clean,corrupted", "a,b"], r"b.csv: no answer column"),
    ("b.csv", ["clean,correct", "a,b"], r"b.csv: a task CSV needs the columns clean and corrupted"),
    ("b.csv", ["clean,corrupted,correct_idx,incorrect_idx", "Mary,John,x,3"],
     r"b.csv, row 1, field 'correct_idx': 'x' is not an integer"),
    ("b.csv", ["clean,corrupted,label", "Mary,John,99"], r"b.csv, row 1, field 'label': 99: expected .* 0\.\.98"),
    ("b.csv", ["clean,corrupted,correct", "Mary,John,Anne,Paul"], r"b.csv, row 1: 4 cells, the header has 3 columns"),
])
def test_bad_task_files_are_one_line_naming_file_row_and_field(tmp_path, model, name, content, pattern):
    path = tmp_path / name
    path.write_text("\n".join(content) + ("\n" if content else ""))
    with pytest.raises(CircuitsError, match=pattern) as err:
        load_task_file(path, model)
    assert len(str(err.value).splitlines()) == 1 and str(path) in str(err.value)


def test_missing_file_and_too_many_examples_are_refused(tmp_path, model):
    with pytest.raises(CircuitsError, match=r"task file .*nope.csv: not found"):
        load_task_file(tmp_path / "nope.csv", model)
    path = _write_jsonl(tmp_path / "two.jsonl", [{"clean": [1], "corrupted": [2], "correct": 3}] * 2)
    with pytest.raises(CircuitsError, match="3 examples asked for, the file has 2 rows"):
        load_task_file(path, model, n_examples=3)


def _fake_model(attention_dir: str):
    cfg = SimpleNamespace(d_vocab=20, n_ctx=16, d_vocab_out=20, attention_dir=attention_dir, default_prepend_bos=False)
    return SimpleNamespace(cfg=cfg, tokenizer=None)


def test_padding_is_refused_for_a_bidirectional_model_and_text_needs_a_tokenizer(tmp_path):
    ragged = _write_jsonl(tmp_path / "r.jsonl", [{"clean": [1, 2, 3], "corrupted": [4, 2, 3], "correct": 5},
                                                 {"clean": [1, 2], "corrupted": [4, 2], "correct": 5}])
    assert load_task_file(ragged, _fake_model("causal")).is_padded
    with pytest.raises(CircuitsError, match=r"task r: its prompts are right-padded, .* this model attends both ways"):
        load_task_file(ragged, _fake_model("bidirectional"))
    even = _write_jsonl(tmp_path / "e.jsonl", [{"clean": [1, 2], "corrupted": [4, 2], "correct": 5}] * 2)
    assert not load_task_file(even, _fake_model("bidirectional")).is_padded  # one length: no padding, accepted
    text = _write_jsonl(tmp_path / "t.jsonl", [{"clean": "Mary", "corrupted": "John", "correct": 5}])
    with pytest.raises(CircuitsError, match=r"t.jsonl, row 1, field 'clean': text needs the model's tokenizer"):
        load_task_file(text, _fake_model("causal"))


# ---------------------------------------------------------------- padding is exact


@pytest.mark.parametrize("method", ["eap", "eap-ig", "patching"])
def test_a_padded_row_scores_as_that_row_alone(tmp_path, model, method):
    task = load_task_file(_ioi_csv(tmp_path / "ioi.csv", model), model)
    assert task.is_padded
    per_example = score_edges_per_example(model, task, method)
    for row in range(task.n_examples):
        n = int(task.lengths[row])
        alone = load_task_file(_ioi_csv(tmp_path / "ioi.csv", model), model)  # then cut down to the one row
        alone = type(task)("ioi", alone.clean[row : row + 1, :n], alone.corrupted[row : row + 1, :n],
                           alone.answer_pos[row : row + 1], alone.correct[row : row + 1], alone.wrong[row : row + 1])
        expected = score_edges(model, alone, method)
        assert np.abs(per_example[row] - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_mean_ablation_averages_only_rows_real_at_each_position(tmp_path, model):
    from circuits.discovery.faithfulness import Evaluator, real_row_mean
    from circuits.discovery.functional import FunctionalModel

    writers = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 3, 4, 1)  # [w, batch 3, pos 4, d 1]
    real = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    mean = real_row_mean(writers, real)
    # position 0: rows 0, 1, 2 = (0 + 4 + 8) / 3; position 1: rows 0, 1 = (1 + 5) / 2; positions 2, 3: row 0 alone
    assert mean[0, :, :, 0].tolist() == [[4.0, 3.0, 2.0, 3.0]] * 3
    # So the pad token is invisible to a mean-ablated run: another pad id, the same faithfulness.
    task = load_task_file(_ioi_csv(tmp_path / "ioi.csv", model), model)
    other = type(task)("ioi", torch.where(task.real_positions(), task.clean, 7),
                       torch.where(task.real_positions(), task.corrupted, 7), task.answer_pos, task.correct,
                       task.wrong, lengths=task.lengths)
    fm = FunctionalModel(model)
    circuit = np.zeros(fm.spec.shape, dtype=bool)
    circuit[:, -1] = fm.spec.valid[:, -1]  # every edge into the logits
    one, two = Evaluator(fm, task, "mean", gap_z=0.0), Evaluator(fm, other, "mean", gap_z=0.0)
    assert one.baseline == pytest.approx(two.baseline, abs=1e-6)
    assert float(one.ablator.metrics(torch.tensor(~circuit[None], dtype=torch.float32))[0]) == pytest.approx(
        float(two.ablator.metrics(torch.tensor(~circuit[None], dtype=torch.float32))[0]), abs=1e-6)


# ---------------------------------------------------------------- end to end


def test_sweep_of_an_ioi_csv_and_a_jsonl_makes_readable_studies(tmp_path, run_dir, model):
    import circuits
    from circuits.sweep import sweep

    jsonl = _write_jsonl(tmp_path / "texts.jsonl", [
        {"clean": clean, "corrupted": corrupt, "correct": f" {io}", "wrong": [f" {s}"]} for clean, corrupt, io, s in IOI_ROWS])
    for path in (_ioi_csv(tmp_path / "ioi.csv", model), jsonl):
        out = tmp_path / f"study-{path.stem}"
        study = sweep(run_dir, path, out, method="eap", resamples=2, trust_steps=0, hooks="blocks.*.hook_resid_post",
                      dtype="float32", progress=False, analyses=None)
        study = circuits.open_study(out)
        assert study.steps == [0] and study.n_examples == 3
        task = study.task
        assert task.name == path.stem and task.lengths.tolist() == [len(_ids(model, c)) for c, *_ in IOI_ROWS]
        assert study.provenance["task"]["metric"] == "logit_diff" and study.provenance["task"]["padded"]
        assert study.shard_provenance(0)["task"]["prompt_hash"] == task.prompt_hash()
        with torch.no_grad():
            want = metric_per_example(model(task.clean), task).numpy()
        np.testing.assert_allclose(study.metric(per_example=True)[0], want, rtol=1e-4, atol=1e-5)
        assert study.array_at(0, "task/lengths").tolist() == task.lengths.tolist()
        # the stored loss reads the answer positions only: minus the log-probability of the correct token
        logprob = type(task)("lp", task.clean, task.corrupted, task.answer_pos, task.correct, metric="logprob",
                             lengths=task.lengths)
        np.testing.assert_allclose(study.loss(per_example=True)[0], -metric_per_example(model(task.clean), logprob)
                                   .detach().numpy(), rtol=1e-4, atol=1e-5)
        assert study.has("circuit/scores")


def test_cli_sweep_takes_a_task_file_and_exits_non_zero_on_a_bad_one(tmp_path, run_dir, monkeypatch, capsys):
    from circuits import cli

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"clean": "Mary John", "corrupted": "Mary", "correct": " Anne"}])
    monkeypatch.setattr(sys, "argv", ["circuits", "sweep", str(run_dir), "--task", str(bad), "--out",
                                      str(tmp_path / "s"), "--no-progress", "--hooks", "none"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert re.search(r"error: .*bad.jsonl, row 1, field 'corrupted': 1 tokens, the clean prompt 2", err[0])
