"""A search whose optuna.db is damaged or gone resumes from a study rebuilt out of its trial folders."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NO_HOST_OOM_KILLS, TINY, kill_session, result_rows, run_search, wait_until

NAME = "interrupted"
# Three trials one after another, two epochs each: the first ends, the second is cut mid-run, the third
# never started when the search is killed. Rows enough for a trial to run for seconds past its first report
# (Ray copies result.json into the search folder once a second): tiny.yaml's 96 rows can end a trial unseen.
SMALL = ["--set", "search.num_samples=3", "--set", "search.max_concurrent=1", "--set", "training.epochs=2",
         "--set", "search.asha.grace_period=2", "--set", "data.synthetic_size=400",
         "--set", "training.eval_every=0.5"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A search killed (SIGKILL) while its second trial runs, its first trial finished."""
    import os
    storage = tmp_path_factory.mktemp("interrupted")
    experiment = storage / NAME
    leader = subprocess.Popen(
        [sys.executable, "-m", "tune_llama.search", str(TINY), "--name", NAME, "--storage", str(storage), *SMALL],
        cwd=storage, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", **NO_HOST_OOM_KILLS})
    try:
        saved = wait_until(lambda: second_trial_reported(experiment) and state_saved_at(experiment), leader,
                           "the second trial's first report", timeout=600)
        # Ray's next state save (every second here) knows the second trial's checkpoint.
        wait_until(lambda: state_saved_at(experiment) > saved, leader, "a save of Ray's state after that report",
                   timeout=120)
    finally:
        kill_session(leader)
    pristine = storage / "pristine"
    shutil.copytree(experiment, pristine)
    return pristine


def state_saved_at(experiment: Path) -> int:
    """When Ray last saved its experiment state into the folder (ns), 0 before the first save."""
    from tune_llama.ray_private import newest_state
    state = newest_state(experiment)
    try:
        return state.stat().st_mtime_ns if state else 0
    except FileNotFoundError:  # replaced between the glob and the stat
        return 0


def second_trial_reported(experiment: Path) -> bool:
    rows = result_rows(experiment)
    return len(rows) >= 2 and any(r and r[-1]["epoch"] < 2 for r in rows.values())


def copy_of(pristine: Path) -> Path:
    """The interrupted search, as it was, back in its own folder: Ray's pickled run config names that path, so
    a copy elsewhere would resume into the original."""
    experiment = pristine.parent / NAME
    shutil.rmtree(experiment, ignore_errors=True)
    shutil.copytree(pristine, experiment)
    return experiment


def resume_and_check(experiment: Path, expect_damaged: bytes | None) -> str:
    import optuna
    folders_before = {name: rows for name, rows in result_rows(experiment).items()}
    # Every trial the search knows, from its folder or from Ray's state: a trial Ray created just before the
    # kill has an empty folder, and it comes back as running for Ray's resume to run.
    from tune_llama.results import load_search
    started = len(load_search(experiment).trials)
    proc = run_search(["--resume", str(experiment)], cwd=experiment.parent, env_extra=NO_HOST_OOM_KILLS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"{started} trials restored" in (experiment / "summary.txt").read_text()
    assert "Traceback" not in out and "sqlalchemy" not in out.lower(), out[-3000:]
    assert "already reported" not in out, out[-3000:]  # the resumed trial's repeated reports, dropped quietly
    damaged = experiment / "optuna.db.damaged"
    if expect_damaged is None:
        assert not damaged.exists()
    else:
        assert damaged.read_bytes() == expect_damaged

    # The search went on to num_samples, and the study holds every trial, told as the folders say.
    rows = result_rows(experiment)
    assert len(rows) == 3 and all(r[-1]["epoch"] == 2 for r in rows.values()), {k: len(v) for k, v in rows.items()}
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{experiment / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), trials
    by_params = {tuple(sorted(t.params.items())): t for t in trials}
    for name, trial_rows in rows.items():
        params = tuple(sorted(trial_rows[0]["config"].items()))
        frozen = by_params[params]
        # Restored trials carry their best report; those Ray tells afterwards, the last.
        assert frozen.value == (min(r["eval_loss"] for r in trial_rows) if name in folders_before
                                and folders_before[name][-1]["epoch"] == 2 else trial_rows[-1]["eval_loss"])
        assert sorted(frozen.intermediate_values.values()) == sorted(r["eval_loss"] for r in trial_rows)
        assert all(math.isfinite(v) for v in frozen.intermediate_values.values())
    # The trial that had finished was not run again.
    finished = [n for n, r in folders_before.items() if r and r[-1]["epoch"] == 2]
    assert finished and all(rows[n] == folders_before[n] for n in finished)
    return out


def test_a_truncated_study_is_moved_aside_and_rebuilt_from_the_trial_folders(interrupted):
    experiment = copy_of(interrupted)
    db = experiment / "optuna.db"
    cut = db.read_bytes()[: db.stat().st_size // 2]
    db.write_bytes(cut)
    resume_and_check(experiment, cut)


def test_a_study_of_garbage_bytes_is_moved_aside_and_rebuilt(interrupted):
    experiment = copy_of(interrupted)
    garbage = bytes(range(256)) * 64
    (experiment / "optuna.db").write_bytes(garbage)
    resume_and_check(experiment, garbage)


def test_a_missing_study_is_rebuilt(interrupted):
    experiment = copy_of(interrupted)
    (experiment / "optuna.db").unlink()
    resume_and_check(experiment, None)
