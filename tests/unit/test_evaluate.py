"""GSM8K evaluation: answer extraction as lm-evaluation-harness does it, intervals, stopping,
the calculator, and end-to-end runs on tiny models (one trained until it answers correctly)."""

from __future__ import annotations

import argparse
import json
import re
from fractions import Fraction

import pytest
import torch

from tune_llama.calculator import calculate
from tune_llama.__main__ import command
from tune_llama.cli import run_cli
from tune_llama.data import final_answer, load_test
from tune_llama.evaluate import (
    DATA_VARIABLE, add_arguments, default_data_source, extract_flexible, extract_strict, gsm8k_accuracy, main,
    normalize, score, wilson_interval,
)
from tune_llama.generate import Row, RowWatch, truncate_at_stop
from tune_llama.spec import DataSpec

ROW_FIELDS = {"index", "question", "generated", "strict", "flexible", "gold", "correct_strict", "correct_flexible"}


# ---------------------------------------------------------------- extraction and scores

@pytest.mark.parametrize("text, strict, flexible", [
    ("48/2 = <<48/2=24>>24 clips in May.\n#### 1,234", "1234", "1234"),
    ("So she pays $5.", None, "5"),
    ("The temperature falls to -7 degrees.\n#### -7", "-7", "-7"),
    ("It drops by 3, so the answer is -12", None, "-12"),
    ("#### 18\nThen 25 more were added", "18", "25"),  # strict takes the marked answer, flexible the last number
    ("I do not know the answer.", None, None),
    ("", None, None),
])
def test_strict_and_flexible_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_normalisation_drops_commas_dollars_and_a_trailing_dot_only():
    assert normalize("$1,234.") == "1234"
    assert normalize("3.50") == "3.50"  # exact match, as lm-eval: no numeric rounding
    assert normalize(None) is None


def test_gold_answers_normalise_the_same_way():
    assert normalize(final_answer("2 + 3 = <<2+3=5>>5\n#### 1,005")) == "1005"


def test_real_gsm8k_answers_score_correct_when_written_out_as_the_output(gsm8k_dir):
    problems = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:200]]
    for p in problems:
        text = truncate_at_stop(p["answer"] + "\n\nQuestion: and the next one?")
        gold = normalize(final_answer(p["answer"]))
        assert extract_strict(text) == gold and extract_flexible(text) == gold, p["answer"]


def test_wilson_interval_is_sound_at_the_edges_and_contains_the_rate():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-4)
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - low == pytest.approx(0.178, abs=2e-3)


# ---------------------------------------------------------------- stopping

def test_generation_is_cut_where_a_new_question_starts():
    assert truncate_at_stop("5 + 5 = 10\n#### 10\n\nQuestion: next one") == "5 + 5 = 10\n#### 10"
    assert truncate_at_stop("no stop here ") == "no stop here"


@pytest.mark.parametrize("text, kept", [
    ("5 + 5 = 10\n#### 10\nAnd then 12 more", "5 + 5 = 10\n#### 10"),
    ("#### 1,234  \n#### 7\n", "#### 1,234"),
    ("#### -3\nQuestion: next", "#### -3"),
    ("#### 10", "#### 10"),  # the line is not complete, so nothing follows it to cut
    ("#### ten\n#### 10\nmore", "#### ten\n#### 10"),  # the first line with a number, as strict extraction reads
])
def test_generation_is_cut_after_its_first_complete_answer_line(text, kept):
    assert truncate_at_stop(text) == kept


def watch_after_one_step(tokenizer, rows: list[tuple[str, str, str]], calculator: bool = False) -> RowWatch:
    """A RowWatch seeing one generation step: each row is (prompt, text generated in earlier calls,
    the one character generated now), left-padded as ``generate`` holds them."""
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    state = [Row(ids(prompt), ids(before)) for prompt, before, _ in rows]
    width = max(len(r.prompt) + len(r.new) for r in state)
    watch = RowWatch(tokenizer, state, width, max_new_tokens=100, calculator=calculator)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r.prompt) - len(r.new)) + r.prompt + r.new
                              + ids(now) for r, (_, _, now) in zip(state, rows)])
    stops = watch(input_ids)
    assert stops.tolist() == [s is not None for s in watch.stopped_at]
    return watch


def test_a_row_stops_at_its_own_first_complete_answer_line_not_at_one_in_the_prompt(char_tokenizer):
    few_shot = "Question: 1+2?\nAnswer: #### 3\n\nQuestion: 7*2?\nAnswer: "
    watch = watch_after_one_step(char_tokenizer, [
        (few_shot, "7*2 = 14\n#### 14", "\n"),
        (few_shot, "7*2 = 14\n#### 1", "4"),  # no newline yet: the number may go on
        ("Question: 7*2?\nAnswer: ", "", "1"),
        (few_shot, "7*2 = 14\n\nQuestion", ":"),
    ])
    assert [s is not None for s in watch.stopped_at] == [True, False, False, True]


def test_a_row_stops_at_a_calculator_call_only_when_the_calculator_can_compute_it(char_tokenizer):
    rows = [("Question: 7*2?\nAnswer: ", "7*2 = <<7*2", "="), ("Q: ?\nA: ", "<<7*x", "=")]
    assert watch_after_one_step(char_tokenizer, rows, calculator=False).results == [None, None]
    watch = watch_after_one_step(char_tokenizer, rows, calculator=True)
    assert watch.results == ["14", None]
    assert [s is not None for s in watch.stopped_at] == [True, False]


# ---------------------------------------------------------------- the calculator

@pytest.mark.parametrize("expression, value", [
    ("48/2", "24"), ("2+3*4", "14"), ("(2+3)*4", "20"), ("10-4-3", "3"), ("100/10/5", "2"),
    ("7/2", "3.5"), ("10/3", "3.3333"), ("2/3", "0.6667"), ("-3--2", "-1"), ("-(2+3)*2", "-10"),
    ("1,234+1", "1235"), (".5*3", "1.5"), ("0.1+0.2", "0.3"), ("12.50+12.50+5.00", "30"),
    ("20%*50", "10"), (" 2 + 3 ", "5"), ("((1+2))*(3)", "9"),
])
def test_the_calculator_follows_arithmetic_precedence_and_writes_results_as_gsm8k_does(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "", "3-", "(1+2", "1+2)", "1/0", "2**3", "1,23", "1e3", "x+1", "2 3", "12 apples",
    "__import__('os').system('touch /tmp/calculator-pwned')", "().__class__", "1" + "+1" * 150,
])
def test_the_calculator_gives_none_for_anything_but_arithmetic(expression):
    assert calculate(expression) is None


def test_the_calculator_recomputes_every_annotation_of_the_real_gsm8k_test_split(gsm8k_dir):
    text = (gsm8k_dir / "test.jsonl").read_text()
    calls = re.findall(r"<<([^<>=]*)=([^<>]*)>>", "".join(json.loads(line)["answer"] for line in text.splitlines()))
    assert len(calls) > 4000
    wrong = [(lhs, rhs, calculate(lhs)) for lhs, rhs in calls
             if calculate(lhs) is None or Fraction(calculate(lhs)) != Fraction(rhs.replace(",", ""))]
    assert wrong == []


# ---------------------------------------------------------------- end to end on random:tiny

def test_gsm8k_accuracy_on_a_tiny_model_writes_one_jsonl_line_per_problem(tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    summary = gsm8k_accuracy("random:tiny", data="synthetic", limit=5, batch_size=2, shots=1, max_new_tokens=12,
                             out=out, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    problems = load_test(DataSpec(source="synthetic"))[:5]
    assert [r["question"] for r in rows] == [p["question"] for p in problems]
    assert [r["gold"] for r in rows] == [normalize(final_answer(p["answer"])) for p in problems]
    for r in rows:
        assert set(r) >= ROW_FIELDS
        assert r["correct_strict"] == (r["strict"] == r["gold"]) and r["correct_flexible"] == (r["flexible"] == r["gold"])
        assert "Question:" not in r["generated"]
    assert summary["n"] == 5 and summary["shots"] == 1 and summary["calculator"] is False
    assert summary["strict"]["correct"] == sum(r["correct_strict"] for r in rows)
    for kind in ("strict", "flexible"):  # kept problem by problem, in the problems' order, for paired comparisons
        assert summary[kind]["per_problem"] == [r[f"correct_{kind}"] for r in rows]
    printed = capsys.readouterr().out
    assert "strict-match" in printed and "flexible-extract" in printed and "Wilson" in printed


def test_the_cli_mounts_under_another_parser_and_runs_calculator_mode(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tune-llama")
    add_arguments(parser.add_subparsers(dest="command").add_parser("evaluate"))
    out = tmp_path / "calc.jsonl"
    args = parser.parse_args(["evaluate", "random:tiny", "--data", "synthetic", "--limit", "3", "--batch-size", "2",
                              "--max-new-tokens", "16", "--calculator", "--device", "cpu", "--out", str(out)])
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) >= ROW_FIELDS and isinstance(r["generated"], str) for r in rows)
    assert "calculator" in capsys.readouterr().out


def test_the_default_data_is_the_environment_variable_else_the_hub(monkeypatch):
    monkeypatch.delenv(DATA_VARIABLE, raising=False)
    assert default_data_source() == "openai/gsm8k"
    monkeypatch.setenv(DATA_VARIABLE, "/data/gsm8k")
    assert default_data_source() == "/data/gsm8k"


def test_without_data_the_evaluation_reads_the_folder_the_environment_names(tmp_path, monkeypatch):
    rows = [{"question": f"What is {n} plus 1?", "answer": f"{n}+1 = <<{n}+1={n + 1}>>{n + 1}\n#### {n + 1}"}
            for n in range(3)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv(DATA_VARIABLE, str(tmp_path))
    summary = gsm8k_accuracy("random:tiny", max_new_tokens=4, out=tmp_path / "eval.jsonl", device="cpu")
    assert summary["data"] == str(tmp_path) and summary["n"] == 3


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(command("evaluate"), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_missing_model_directory_is_a_one_line_error(tmp_path, capsys):
    assert "no-model" in one_line_error([str(tmp_path / "no-model"), "--data", "synthetic"], capsys)


def test_a_missing_data_folder_is_a_one_line_error_naming_where_it_was_set(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DATA_VARIABLE, raising=False)
    err = one_line_error(["random:tiny", "--data", str(tmp_path / "no-data"), "--device", "cpu"], capsys)
    assert err.startswith("error: --data:") and "no-data" in err
    monkeypatch.setenv(DATA_VARIABLE, str(tmp_path / "gone"))
    err = one_line_error(["random:tiny", "--device", "cpu"], capsys)
    assert err.startswith(f"error: {DATA_VARIABLE}:") and "gone" in err


def test_an_unwritable_out_file_is_a_one_line_error_before_generating(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    err = one_line_error(["random:tiny", "--data", "synthetic", "--device", "cpu",
                          "--out", str(tmp_path / "a-file" / "eval.jsonl")], capsys)
    assert err.startswith("error: --out:") and "a-file" in err


# ---------------------------------------------------------------- a model that knows the answers

LEARNED = [  # two calculator calls; none; a wrong one (9-4 is 5) that the calculator will overrule
    {"question": "Ann has 2 pens and buys 3 more. How many pens?",
     "answer": "2+3 = <<2+3=5>>5 pens.\n5*4 = <<5*4=20>>20\n#### 20"},
    {"question": "What is 6 times 7?", "answer": "#### 42"},
    {"question": "Bo had 9 cups and broke 4. How many are left?", "answer": "9-4 = <<9-4=6>>6\n#### 6"},
]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """random:tiny trained until greedy decoding writes out LEARNED's answers (a few seconds)."""
    from tune_llama.loop import fit, setup
    from tune_llama.spec import spec_from_dict

    folder = tmp_path_factory.mktemp("learned")
    (folder / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in LEARNED * 16))
    spec = spec_from_dict({
        "model": {"name": "random:tiny"},
        "data": {"source": str(folder), "val_size": 1, "batch_size": 8, "max_length": 160},
        "training": {"epochs": 40, "lr": 3e-3, "device": "cpu", "seed": 0},
    })
    return fit(setup(spec))


def test_a_model_that_writes_the_gold_answers_is_scored_correct_strict_and_flexible(learned, tmp_path):
    out = tmp_path / "learned.jsonl"
    template = learned.spec.data.prompt_template
    was_training = learned.model.training
    summary = score(learned.model, learned.tokenizer, LEARNED, template, batch_size=3, max_new_tokens=64, out=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["generated"] for r in rows] == [p["answer"] for p in LEARNED]
    assert summary["strict"]["correct"] == summary["flexible"]["correct"] == summary["n"] == 3
    assert summary["strict"]["accuracy"] == 1.0 and summary["calculator"] is False
    assert summary["strict"]["per_problem"] == summary["flexible"]["per_problem"] == [True, True, True]
    assert learned.model.training == was_training


def test_the_calculator_overrules_the_models_arithmetic_and_leaves_right_arithmetic_alone(learned, tmp_path):
    template = learned.spec.data.prompt_template
    summary = score(learned.model, learned.tokenizer, LEARNED, template, batch_size=3, max_new_tokens=64,
                    calculator=True, out=tmp_path / "calc.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "calc.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in rows[:2]] == [p["answer"] for p in LEARNED[:2]]
    assert rows[2]["generated"].startswith("9-4 = <<9-4=5>>")
    assert summary["calculator"] is True and summary["n"] == 3
    assert summary["strict"]["per_problem"] == [r["correct_strict"] for r in rows]
