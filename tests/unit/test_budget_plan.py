"""``search.budget``: the plan a budget buys (trials, rungs, the winner's length), the configs it tries, and the
rules that pick a search's winner; all without Ray."""

from __future__ import annotations

import math

import pytest

from conftest import TINY
from tune_llama.budget import MIN_TRIALS, design, halving_rungs, patience, plan, read_plan, trials_spec
from tune_llama.errors import SpecError
from tune_llama.results import Search, Trial
from tune_llama.spec import load_spec
from tune_llama.summary import answer_lines
from tune_llama.warm_start import first_points, misfit

QUARTERS = ["training.eval_every=0.25"]


def tiny(*overrides: str):
    return load_spec(TINY, [*QUARTERS, *overrides])


def test_a_budget_of_two_runs_on_tiny_buys_five_trials_cut_at_a_sixteenth_and_a_quarter_of_the_run():
    p = plan(tiny("search.budget=2", "search.num_samples=100"))
    assert (p.trials, p.rungs, p.keep) == (MIN_TRIALS, (0.25, 1.0), (2, 1))
    assert p.explore_epochs == 5.75 and p.winner_epochs == 4.0 + 8.0 - 5.75


def test_a_bracket_takes_a_third_of_a_large_budget():
    p = plan(tiny("search.budget=8", "search.num_samples=1000"))
    assert (p.trials, p.keep) == (15, (5, 1)) and p.explore_epochs <= 8 * 4 / 3


@pytest.mark.parametrize("budget", [1.45, 1.7, 2, 3, 4, 6.5, 8, 16])
@pytest.mark.parametrize("every", [0.1, 0.25, 0.5, 1.0, 7])
def test_no_plan_spends_more_than_its_budget_and_its_winner_trains_at_least_a_full_run(budget, every):
    p = plan(load_spec(TINY, [f"training.eval_every={every}", f"search.budget={budget}", "search.num_samples=1000"]))
    assert p.explore_epochs <= p.budget_epochs + 1e-9
    assert p.winner_epochs >= p.run_epochs
    assert math.isclose(p.explore_epochs + (p.winner_epochs - p.run_epochs), max(p.budget_epochs, p.explore_epochs))
    assert p.trials >= MIN_TRIALS or (p.trials == 1 and "too small" in p.lines()[0])  # coarse reports cost more
    assert list(p.rungs) == sorted(p.rungs) and all(r < p.run_epochs for r in p.rungs)


def test_larger_budgets_try_more_configs_and_train_their_winner_longer():
    plans = [plan(tiny(f"search.budget={k}", "search.num_samples=1000")) for k in (2, 4, 8, 16)]
    assert [p.trials for p in plans] == sorted(p.trials for p in plans) and plans[-1].trials > plans[0].trials
    assert [p.winner_epochs for p in plans] == sorted(p.winner_epochs for p in plans)


def test_a_budget_too_small_to_search_trains_the_specs_own_config_for_all_of_it_and_says_so():
    p = plan(tiny("search.budget=1.4"))
    assert (p.trials, p.rungs, p.winner_epochs) == (1, (), 1.4 * 4)
    assert "too small to search" in p.lines()[0] and "spec's own config" in p.lines()[0]


def test_num_samples_caps_the_trials_a_budget_plans_and_the_rest_goes_to_the_winner():
    free, capped = plan(tiny("search.budget=8", "search.num_samples=1000")), plan(tiny("search.budget=8",
                                                                                       "search.num_samples=6"))
    assert capped.trials == 6 < free.trials and capped.winner_epochs > free.winner_epochs


def test_without_num_samples_a_budget_sizes_the_search_and_without_a_budget_it_is_eight():
    raw_spec = load_spec(TINY, ["search.budget=16"])  # tiny.yaml names num_samples: 6, which then caps it
    assert plan(raw_spec).trials == 6
    from tune_llama.spec import spec_from_dict
    assert spec_from_dict({"search": {"budget": 4}}).search.num_samples is None
    assert spec_from_dict({}).search.num_samples == 8


@pytest.mark.parametrize("value, words", [(0, "must be a number of runs > 0"), (-2, "must be a number of runs > 0"),
                                          ("'four'", "must be a number"), (".nan", "must be a number of runs > 0")])
def test_a_budget_that_is_not_a_positive_number_is_refused_naming_the_field(value, words):
    with pytest.raises(SpecError) as err:
        tiny(f"search.budget={value}")
    assert err.value.path == "search.budget" and words in str(err.value)


def test_a_budget_with_asha_is_refused_in_one_line():
    with pytest.raises(SpecError, match="search.budget: sizes a halving search"):
        tiny("search.budget=2", "search.scheduler=asha")


def test_the_plan_is_written_into_the_search_folder_and_read_back_whole(tmp_path):
    p = plan(tiny("search.budget=3"))
    p.write(tmp_path)
    assert read_plan(tmp_path) == p


def test_every_trial_trains_on_the_schedule_of_the_winners_run():
    spec = tiny("search.budget=2.2")
    assert trials_spec(spec, plan(spec)).training.epochs == math.ceil(plan(spec).winner_epochs)
    assert trials_spec(spec, None) is spec


def test_the_winner_stops_after_two_epochs_without_a_better_report():
    assert patience(tiny()) == 8 and patience(load_spec(TINY)) == 3


# ---------------------------------------------------------------- the configs a bracket tries

def test_the_specs_own_config_is_the_first_trial():
    points, notes = first_points(tiny())
    assert points[0] == {"training.lr": 3e-3, "training.gradient_accumulation_steps": 1, "training.optimizer": "adamw"}
    assert notes == []


def test_a_spec_config_outside_the_space_is_left_out_with_a_note_naming_the_field():
    points, notes = first_points(tiny("training.lr=0.5"))
    assert points == []
    assert "training.lr=0.5 outside [0.0001, 0.03]" in notes[0] and "include_spec_config" in notes[0]


def test_include_spec_config_false_leaves_it_out():
    assert first_points(tiny("search.include_spec_config=false")) == ([], [])


def test_the_design_puts_one_config_in_each_stratum_of_every_range_and_uses_each_choice_equally():
    space = tiny().search.space
    points = design(space, 6, seed=3)
    assert all(misfit(p, space) is None for p in points)
    low, high = space["training.lr"]["loguniform"]
    strata = sorted(int(6 * math.log(p["training.lr"] / low) / math.log(high / low)) for p in points)
    assert strata == list(range(6))
    assert sorted(p["training.optimizer"] for p in points) == ["adamw"] * 3 + ["sgd"] * 3
    assert design(space, 6, seed=3) == points and design(space, 6, seed=4) != points


def test_int_and_quantised_ranges_stay_on_their_grid():
    space = {"model.lora.r": {"int": [4, 9]}, "training.weight_decay": {"quniform": [0.0, 0.1, 0.05]}}
    for p in design(space, 12, seed=0):
        assert misfit(p, space) is None


# ---------------------------------------------------------------- rungs without a budget

def test_halving_without_asha_settings_uses_the_measured_rungs():
    spec = tiny("search.asha.grace_period=null", "search.asha.reduction_factor=null")
    assert halving_rungs(spec) == [(0.25, 2), (1.0, 4)]
    assert halving_rungs(tiny()) == [(1.0, 2), (2.0, 2)]  # tiny.yaml's own grace period 1, factor 2


# ---------------------------------------------------------------- the winner

def rows(*points, status="running"):
    return [{"report": i + 1, "step": i + 1, "epoch": e, "eval_loss": v, "eval_perplexity": math.exp(v),
             "status": status if i == len(points) - 1 else "running"} for i, (e, v) in enumerate(points)]


def search_of(*trials) -> Search:
    return Search(path=__import__("pathlib").Path("/nonexistent"), spec=tiny(), trials=list(trials))


def test_the_winner_is_chosen_among_trials_that_trained_to_full_length():
    cut = Trial("cut", None, {"training.lr": 0.01}, rows((1.0, 2.0)))  # cut at a rung, on a better number
    full = Trial("full", None, {"training.lr": 0.003}, rows((1.0, 3.0), (4.0, 2.5), status="completed"))
    search = search_of(cut, full)
    assert search.best()[0] is full and [t.trial_id for t, _ in search.ranked()] == ["full", "cut"]


def test_when_no_trial_reached_full_length_the_best_so_far_is_named_with_a_note():
    cut = Trial("cut", None, {"training.lr": 0.01}, rows((1.0, 2.0)))
    search = search_of(cut)
    assert search.best()[0] is cut
    assert "no trial has trained the full 4 epochs" in answer_lines(search)[0]


def test_the_summary_states_the_winner_against_the_specs_own_config_and_what_it_cost():
    own = Trial("own", None, {"training.lr": 3e-3, "training.gradient_accumulation_steps": 1,
                              "training.optimizer": "adamw"}, rows((1.0, 3.5), (4.0, 2.0), status="completed"))
    other = Trial("other", None, {"training.lr": 1e-2, "training.gradient_accumulation_steps": 1,
                                  "training.optimizer": "adamw"}, rows((1.0, 3.0), (4.0, 1.5), (6.0, 1.6)))
    lines = answer_lines(search_of(own, other))
    assert lines[0] == "best eval_loss 1.5000 against your config's 2.0000 (-25%), for 10 trial-epochs = 2.5 runs"
    assert not any("still improving" in line for line in lines)


def test_a_winner_still_improving_at_its_last_report_is_said_to_want_more_training():
    own = Trial("own", None, {"training.lr": 3e-3, "training.gradient_accumulation_steps": 1,
                              "training.optimizer": "adamw"}, rows((2.0, 3.0), (4.0, 2.0), status="completed"))
    lines = answer_lines(search_of(own))
    assert lines[0].startswith("best eval_loss 2.0000 is your own config's")
    assert "still improving at its last report (epoch 4)" in lines[1]
