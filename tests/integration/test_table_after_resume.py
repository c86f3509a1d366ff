"""The live table of a real small search after ``--resume`` and after ``--more``: the title counts every trial
of the search (the extended total), ended trials stay listed, a resumed trial shows its last report, and the
random start-up trials of TPE are marked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NO_HOST_OOM_KILLS, TINY, run_search, wait_until
from tune_llama.results import load_search

TITLE = re.compile(r"^\[\d\d:\d\d:\d\d\] (\d+) of (\d+) trials: ")
ROW = re.compile(r"^([0-9a-f]{8}) (?:(\*| ) )?.* (\d+\.\d\d)/4 +(\S+) +(\S+)  (.+)$")


def tables(log: str) -> list[tuple[tuple[int, int], dict[str, dict]]]:
    """Each table printed: ((trials shown in the title, the title's total), trial id -> its row's cells and
    whether it is marked as drawn at random)."""
    out = []
    for line in log.splitlines():
        title = TITLE.match(line)
        if title:
            out.append(((int(title[1]), int(title[2])), {}))
        elif out and (row := ROW.match(line)):
            out[-1][1][row[1]] = {"random": row[2] == "*", "epoch": float(row[3]), "latest": row[4], "best": row[5],
                                  "status": row[6]}
    return out


def last_rows(experiment: Path) -> dict[str, dict]:
    return {search_trial.trial_id: search_trial.rows[-1] for search_trial in load_search(experiment).trials
            if search_trial.rows}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 3-trial tiny search interrupted (SIGINT) once its second trial has reported, then resumed, then extended
    by 2: (the trials' last reports at the interruption, the resume's log, the extension's log, the folder)."""
    storage = tmp_path_factory.mktemp("resumed")
    experiment = storage / "t"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **NO_HOST_OOM_KILLS}
    with (storage / "first.log").open("w") as log:
        first = subprocess.Popen([sys.executable, "-m", "tune_llama.search", str(TINY), "--name", "t", "--storage",
                                  str(storage), "--set", "search.num_samples=3", "--set", "search.max_concurrent=1",
                                  "--set", "training.eval_every=0.5"], cwd=storage, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        wait_until(lambda: sum(1 for p in experiment.glob("*/result.json") if p.stat().st_size) >= 2, first,
                   "the second trial's first report", timeout=600,
                   detail=lambda: (storage / "first.log").read_text()[-3000:])
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=300) == 3, (storage / "first.log").read_text()[-3000:]
    at_interruption = last_rows(experiment)
    resume = run_search(["--resume", str(experiment)], cwd=storage, env_extra=NO_HOST_OOM_KILLS)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    more = run_search(["--resume", str(experiment), "--more", "2"], cwd=storage, env_extra=NO_HOST_OOM_KILLS)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    return at_interruption, resume.stdout, more.stdout, experiment, (storage / "first.log").read_text()


def test_after_resume_every_earlier_trial_is_listed_with_its_last_report(resumed):
    at_interruption, log, _, _, _ = resumed
    printed = tables(log)
    assert printed, log
    (shown, total), rows = printed[0]
    assert total == 3 and set(at_interruption) <= set(rows), log
    for trial_id, report in at_interruption.items():  # the trial that goes on too: not 0.00/4 and "-"
        assert rows[trial_id]["epoch"] == pytest.approx(report["epoch"], abs=0.01), log
        assert rows[trial_id]["latest"] == f"{report['eval_loss']:.4f}", log
    (_, _), final = printed[-1]
    assert len(final) == 3
    assert all(r["status"] in ("finished", "stopped at rung") for r in final.values()), final


def test_after_more_the_title_counts_the_extended_total_and_ended_trials_stay_listed(resumed):
    _, _, log, experiment, _ = resumed
    assert "extending" not in log  # that line goes to stderr; the tables to stdout
    printed = tables(log)
    assert printed and all(total == 5 for (_, total), _ in printed), log
    earlier = {t.trial_id for t in load_search(experiment).trials if t.path and int(t.path.name.split("_")[3]) <= 3}
    assert len(earlier) == 3
    assert earlier <= set(printed[0][1]) and earlier <= set(printed[-1][1]), log
    assert printed[-1][0] == (5, 5) and len(printed[-1][1]) == 5, log


def test_tpes_random_start_up_trials_are_marked_and_a_search_within_them_says_it_is_random(resumed):
    _, _, log, experiment, first_log = resumed
    assert ("note: a random search: search.num_samples=3 is no more than TPE's 5 start-up trials, so 2 trials are "
            "drawn at random after 1 given and none is proposed by TPE; TPE needs search.num_samples=6 or more "
            "(or --resume DIR --more N later)") in first_log
    number = {t.trial_id: int(t.path.name.split("_")[3]) for t in load_search(experiment).trials}
    rows = tables(log)[-1][1]
    for trial_id, row in rows.items():  # trial 1: the spec's own config (given); 2-5: TPE's random start-up
        assert row["random"] == (number[trial_id] > 1), (trial_id, row)
    summary = (experiment / "summary.txt").read_text()
    assert ("sampler: TPE after 5 start-up trials (1 given, 4 random): all 5 trials were start-up, so this was a "
            "random search; TPE proposes from trial 6 on") in summary
    assert json.loads((experiment / "sampler.json").read_text()) == {"sampler": "tpe", "startup_trials": 5, "given": 1}
