"""GSM8K evaluation: answer extraction as lm-evaluation-harness does it, intervals, an end-to-end run."""

from __future__ import annotations

import json

import pytest

from tune_llama.cli import run_cli
from tune_llama.data import final_answer, load_test
from tune_llama.evaluate import (
    evaluate, extract_flexible, extract_strict, main, normalize, truncate_at_stop, wilson_interval,
)
from tune_llama.spec import DataSpec


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


def test_generation_is_cut_where_a_new_question_starts():
    assert truncate_at_stop("5 + 5 = 10\n#### 10\n\nQuestion: next one") == "5 + 5 = 10\n#### 10"
    assert truncate_at_stop("no stop here ") == "no stop here"


def test_wilson_interval_is_sound_at_the_edges_and_contains_the_rate():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-4)
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - low == pytest.approx(0.178, abs=2e-3)


def test_evaluate_on_a_tiny_model_writes_one_jsonl_line_per_problem(tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    summary = evaluate("random:tiny", data="synthetic", limit=5, batch_size=2, shots=1, max_new_tokens=12,
                       out=out, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    problems = load_test(DataSpec(source="synthetic"))[:5]
    assert [r["question"] for r in rows] == [p["question"] for p in problems]
    assert [r["gold"] for r in rows] == [normalize(final_answer(p["answer"])) for p in problems]
    for r in rows:
        assert set(r) >= {"question", "generated", "strict", "flexible", "gold", "correct_strict", "correct_flexible"}
        assert r["correct_strict"] == (r["strict"] == r["gold"]) and r["correct_flexible"] == (r["flexible"] == r["gold"])
        assert "Question:" not in r["generated"]
    assert summary["n"] == 5 and summary["shots"] == 1
    assert summary["strict"]["correct"] == sum(r["correct_strict"] for r in rows)
    printed = capsys.readouterr().out
    assert "strict-match" in printed and "flexible-extract" in printed and "Wilson" in printed


def test_a_missing_model_directory_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(tmp_path / "no-model"), "--data", "synthetic"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "no-model" in err
