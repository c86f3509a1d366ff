"""The paired comparison of two models on the same problems (exact McNemar and its interval), and the
finalists' winner against the runner-up."""

from __future__ import annotations

import pytest

from tune_llama.finalists import compare_to_runner_up, comparison_text
from tune_llama.paired import clopper_pearson, mcnemar_p, over_seeds, paired_difference, sentence


def vectors(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def test_identical_results_differ_by_zero_and_are_not_distinguishable():
    a, _ = vectors(5, 3, 0, 24)
    c = paired_difference(a, a)
    assert c["difference"] == 0 and c["ci95"] == [0.0, 0.0] and c["p_value"] == 1.0
    assert c["verdict"] == "not distinguishable" and c["a_correct"] == c["b_correct"] == 8
    assert "not distinguishable at this size" in sentence(c)


def test_a_clear_difference_has_an_interval_that_excludes_zero():
    a, b = vectors(2, 18, 2, 10)
    c = paired_difference(a, b)
    assert c["difference"] == pytest.approx(16 / 32)
    assert 0 < c["ci95"][0] < c["difference"] < c["ci95"][1] <= 20 / 32, "at most the discordant share"
    assert c["verdict"] == "better" and "the winner is better" in sentence(c)
    reverse = paired_difference(b, a)
    assert reverse["verdict"] == "worse" and reverse["ci95"] == pytest.approx([-c["ci95"][1], -c["ci95"][0]])


def test_only_the_discordant_problems_count():
    a, b = vectors(0, 3, 1, 28)
    more_agreement = vectors(20, 3, 1, 8)
    assert paired_difference(a, b)["ci95"] == paired_difference(*more_agreement)["ci95"]
    assert paired_difference(a, b)["p_value"] == mcnemar_p(3, 1) == pytest.approx(0.625)


def test_four_problems_against_none_of_32_is_not_enough():
    # The case a percentile bootstrap calls a win (P(no discordant problem drawn) = (28/32)^32 < 2.5%).
    c = paired_difference(*vectors(0, 4, 0, 28))
    assert c["p_value"] == pytest.approx(0.125) and c["verdict"] == "not distinguishable"
    assert c["ci95"][0] < 0 < c["ci95"][1]


def test_the_interval_excludes_zero_exactly_when_the_test_rejects():
    for m in range(1, 15):
        for a_only in range(m + 1):
            c = paired_difference(*vectors(1, a_only, m - a_only, 3))
            excludes = c["ci95"][0] > 0 or c["ci95"][1] < 0
            assert excludes == (c["verdict"] != "not distinguishable"), (a_only, m - a_only)


def test_clopper_pearson_matches_known_values():
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1), abs=1e-9)
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** 0.1, 1.0), abs=1e-9)
    assert clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)


def test_results_on_different_problems_are_refused():
    with pytest.raises(ValueError, match="same problems: 3 against 2"):
        paired_difference([True, False, True], [True, False])


def test_over_seeds_gives_the_mean_and_spread_of_the_difference():
    s = over_seeds([vectors(0, 2, 0, 8), vectors(0, 0, 0, 10), vectors(0, 10, 0, 0)])
    assert s["seeds"] == 3 and s["difference_mean"] == pytest.approx((0.2 + 0 + 1) / 3)
    assert s["difference_spread"] > 0 and s["better_in"] == 1 and s["worse_in"] == 0


def entry(trial_id: str, per_problem: list[list[bool]], eval_loss: float) -> dict:
    accuracies = [sum(p) / len(p) for p in per_problem]
    return {"trial_id": trial_id, "strict_accuracy": sum(accuracies) / len(accuracies), "eval_loss": eval_loss,
            "scores": [{"strict": {"per_problem": p}} for p in per_problem]}


def test_the_finalists_winner_is_compared_with_the_runner_up_seed_by_seed():
    a, b = vectors(1, 6, 0, 1)
    entries = [entry("third", [b, b], 0.5), entry("first", [a, a], 2.0), entry("second", [b, a], 1.0)]
    c = compare_to_runner_up(entries)
    assert (c["winner"], c["runner_up"]) == ("first", "second")
    assert c["difference"] == pytest.approx(6 / 8) and c["verdict"] == "better"
    assert c["over_seeds"]["seeds"] == 2 and c["over_seeds"]["difference_mean"] == pytest.approx(3 / 8)
    assert "the winner (first) is better" in comparison_text(c) and "over 2 seeds" in comparison_text(c)


def test_no_comparison_without_a_runner_up_or_per_problem_results():
    a, b = vectors(1, 6, 0, 1)
    assert compare_to_runner_up([entry("only", [a], 1.0)]) is None
    old = entry("old", [b], 1.0)
    old["scores"] = [{"strict": {"accuracy": 0.1}}]  # written before per-problem results were kept
    assert compare_to_runner_up([entry("new", [a], 1.0), old]) is None
