"""The halving scheduler's waiting rungs, ``--resume DIR --more N`` and ``search.warm_start`` on real searches: real
Ray, real Optuna, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from conftest import TINY, result_rows, run_search
from tune_llama.ray_private import read_trial_states, total_samples
from tune_llama.results import OPTUNA_DB, load_search
from tune_llama.budget import halving_rungs
from tune_llama.scheduler import STATE_FILE


SMALL = ["--set", "training.epochs=2", "--set", "search.max_concurrent=2", "--set", "search.asha.grace_period=1"]


def study_trials(experiment: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{experiment / OPTUNA_DB}")
    return study.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def halving_search(tiny_search) -> Path:
    """tiny.yaml's 6 trials under the halving scheduler, one at a time: the default scheduler, so conftest's
    shared search (read only here), not a search of its own."""
    assert load_search(tiny_search).spec.search.scheduler == "halving"
    return tiny_search


def test_no_trial_goes_past_a_rung_before_reduction_factor_trials_reported_there(halving_search):
    """The first trials at a rung wait (paused) for company, unlike ASHA, which lets them through unopposed."""
    spec = load_search(halving_search).spec
    rows = result_rows(halving_search)
    for milestone, factor in halving_rungs(spec):
        arrivals = sorted(next(r["timestamp"] for r in trial if r["epoch"] >= milestone)
                          for trial in rows.values() if trial[-1]["epoch"] >= milestone)
        if len(arrivals) < factor:
            continue
        full = arrivals[factor - 1]
        for name, trial in rows.items():
            reached = [i for i, r in enumerate(trial) if r["epoch"] >= milestone]
            beyond = trial[reached[0] + 1:] if reached else []  # the reports after the one that reached the rung
            assert not beyond or beyond[0]["timestamp"] >= full, (
                f"{name} went past epoch {milestone} before {factor} trials reported there")
    state = json.loads((halving_search / STATE_FILE).read_text())
    assert state["waiting"] == {}, "a trial was left waiting at rung"


def test_every_trial_the_scheduler_stopped_is_terminated_in_tunes_state_even_when_it_was_paused(halving_search):
    stopped = json.loads((halving_search / STATE_FILE).read_text())["stopped"]
    assert stopped, "the scheduler stopped no trial"
    status = {s["trial_id"]: s["status"] for s in read_trial_states(halving_search)}
    assert {t: status[t] for t in stopped} == {t: "TERMINATED" for t in stopped}


# ---------------------------------------------------------------- --more

def test_more_adds_trials_to_a_finished_search_in_the_same_folder_study_and_scheduler_state(tmp_path):
    experiment = tmp_path / "grow"
    proc = run_search([str(TINY), "--name", "grow", "--storage", str(tmp_path), "--set", "search.num_samples=3",
                       "--set", "search.scheduler=halving", *SMALL], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = {t.trial_id for t in load_search(experiment).trials}
    recorded_before = json.loads((experiment / STATE_FILE).read_text())["recorded"]

    proc = run_search(["--resume", str(experiment), "--more", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = load_search(experiment)
    assert len(found.trials) == 5 and before < {t.trial_id for t in found.trials}
    assert found.spec.search.num_samples == 5 and total_samples(experiment) == 5
    assert len(study_trials(experiment)) == 5, "the new trials went to another study"
    recorded = json.loads((experiment / STATE_FILE).read_text())["recorded"]
    assert all(set(old) <= set(new) for old, new in zip(recorded_before, recorded)), "the rungs were started over"
    assert "trials: 5 of 5" in proc.stdout


def test_warm_start_enqueues_the_old_searchs_best_configs_that_fit_and_notes_the_others(tiny_search, tmp_path):
    old = load_search(tiny_search)
    ranked = [t.params for t, _ in old.ranked()]
    # a narrower lr range that leaves out the old best config: it must be skipped with a note
    best = ranked[0]["training.lr"]
    others = [p["training.lr"] for p in ranked[1:]]
    low = min(others) if not min(others) <= best <= max(others) else best * 1.0001
    high = max(others)
    fits = [p for p in ranked if low <= p["training.lr"] <= high][:2]
    space = (f"{{training.lr: {{loguniform: [{low!r}, {high!r}]}}, training.gradient_accumulation_steps: "
             f"{{choice: [1, 2]}}, training.optimizer: {{choice: [sgd, adamw]}}}}")
    proc = run_search([str(TINY), "--name", "warm", "--storage", str(tmp_path), "--set", "search.num_samples=3",
                       *SMALL, "--set", f"search.warm_start={tiny_search}", "--set", "search.warm_start_k=2",
                       "--set", f"search.space={space}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = [p for p in ranked[:ranked.index(fits[-1])] if p not in fits]
    assert proc.stderr.count("note: search.warm_start: skipped") == len(skipped) >= 1
    first = sorted(study_trials(tmp_path / "warm"), key=lambda t: t.number)[:2]
    assert [t.params for t in first] == fits
