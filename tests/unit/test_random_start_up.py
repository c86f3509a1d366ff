"""TPE's random start-up trials: one function says how many a spec's sampler has, the sampler runs exactly
that many, and each trial is told apart (given first, then random, then TPE's) from the search's record."""

from __future__ import annotations

import pytest

from conftest import TINY
from tune_llama.spec import load_spec
from tune_llama.summary import GIVEN, RANDOM, TPE, drawn


@pytest.mark.parametrize("trials, startup", [(3, 5), (8, 5), (24, 6), (40, 10), (200, 10)])
def test_the_start_up_count_is_a_quarter_of_the_search_from_5_to_10_and_the_sampler_uses_it(trials, startup):
    from tune_llama import tuner
    spec = load_spec(TINY, [f"search.num_samples={trials}"])
    assert tuner.startup_trials(spec) == startup
    assert tuner.sampler(spec)._n_startup_trials == startup
    assert tuner.startup_trials(load_spec(TINY, ["search.sampler=random"])) is None


def test_trials_are_given_then_random_until_the_start_up_count_then_tpes():
    record = {"sampler": "tpe", "startup_trials": 5, "given": 2}
    assert [drawn(record, i) for i in range(7)] == [GIVEN, GIVEN, RANDOM, RANDOM, RANDOM, TPE, TPE]
    assert [drawn({"sampler": "random", "startup_trials": None, "given": 1}, i) for i in range(3)] == \
        [GIVEN, RANDOM, RANDOM]
    assert [drawn({"sampler": "tpe", "startup_trials": 5, "given": 6}, i) for i in (4, 5, 6)] == [GIVEN, GIVEN, TPE]
    assert drawn(None, 0) is None  # a search from before the record: no tag rather than a wrong one


def test_the_table_marks_random_trials_and_explains_the_mark_in_100_columns():
    from tune_llama.progress_bar import WIDTH
    from tune_llama.trial_table import table
    spec = load_spec(TINY)
    params = {"training.lr": 0.000164, "training.gradient_accumulation_steps": 2, "training.optimizer": "adamw"}
    rows = [{"id": f"a000000{i}", "params": params, "epoch": 2.0, "latest": 1.5, "best": 1.4,
             "status": "stopped at rung", "drawn": kind} for i, kind in enumerate([GIVEN, RANDOM, TPE])]
    lines = table(spec, rows).splitlines()
    assert [line.split()[:2] for line in lines[2:5]] == [["a0000000", "lr=0.000164"], ["a0000001", "*"],
                                                         ["a0000002", "lr=0.000164"]]
    assert lines[1].index("params") == lines[3].index("lr=")  # the mark has a column of its own
    assert lines[-1] == "* drawn at random: one of TPE's start-up trials, before it models the results"
    assert max(map(len, lines)) <= WIDTH
    assert " optimi=adamw " in lines[2]  # the mark costs the params two characters, not a word of their names
    unmarked = table(spec, [{**row, "drawn": None} for row in rows]).splitlines()
    assert "*" not in "".join(unmarked) and unmarked[1].index("params") == 9
