"""A search folder has one writer, and a search reads and writes its own folder wherever that folder is now:
a second driver is refused, a copied or moved folder resumes on its own, a search killed before Tune saved
anything starts again, and a trial that left only a checkpoint still counts. Real Ray, real processes."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import NO_HOST_OOM_KILLS, TINY, first_report, kill_session, popen_search, run_search, summary_counts, \
    wait_until
from tune_llama.driver import DRIVER_FILE, lock_held
from tune_llama.results import SPEC_FILE, load_search, read_result_rows
from tune_llama.spec import load_spec

SMALL = ["--set", "training.epochs=2", "--set", "search.asha.grace_period=1", "--set", "search.max_concurrent=2",
         "--set", "wandb.mode=disabled"]


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def study_trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{folder / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def search(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = run_search(argv, cwd=cwd, env_extra=NO_HOST_OOM_KILLS)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- one driver per folder

def test_a_second_search_or_resume_on_a_running_search_is_refused_in_one_line_and_writes_nothing(tmp_path):
    experiment = tmp_path / "live"
    leader = popen_search([str(TINY), "--name", "live", "--storage", str(tmp_path), "--set", "search.num_samples=2",
                           "--set", "search.max_concurrent=1", "--set", "data.synthetic_size=400"], cwd=tmp_path,
                          env_extra=NO_HOST_OOM_KILLS)
    try:
        wait_until(first_report(experiment, by_epoch=4), leader, "the first report")
        assert lock_held(experiment)
        driver = (experiment / DRIVER_FILE).read_bytes()
        for argv in (["--resume", str(experiment)], [str(TINY), "--name", "live", "--storage", str(tmp_path)]):
            proc = run_search(argv, cwd=tmp_path)
            line = proc.stderr.strip()
            assert proc.returncode == 2 and "\n" not in line and "Traceback" not in line, proc.stderr[-2000:]
            assert str(experiment) in line and f"pid {leader.pid} on {socket.gethostname()}" in line
            assert (experiment / DRIVER_FILE).read_bytes() == driver, "the refused driver rewrote driver.json"
        report = subprocess.run([sys.executable, "-m", "tune_llama.report", str(experiment)], capture_output=True,
                                text=True, timeout=600)
        assert report.returncode == 0, report.stderr[-2000:]  # readers work on a running search
        assert leader.wait(timeout=900) == 0, (tmp_path / "search.log").read_text()[-3000:]
    finally:
        kill_session(leader)
    assert summary_counts(experiment).startswith("trials: 2 of 2 (2 ended normally")


# ---------------------------------------------------------------- a folder that moved

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished halving search of 3 trials (two epochs, a rung at the first)."""
    storage = tmp_path_factory.mktemp("finished")
    proc = search([str(TINY), "--name", "original", "--storage", str(storage), "--set", "search.num_samples=3",
                   *SMALL], cwd=storage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "original"


def test_a_copied_search_extended_with_more_reads_and_writes_its_own_folder_and_never_the_original(finished,
                                                                                                  tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    original = fingerprint(finished)
    proc = search(["--resume", str(copy), "--more", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "damaged" not in proc.stderr and "rebuilt" not in proc.stderr, proc.stderr[-3000:]
    assert summary_counts(copy) == "trials: 5 of 5 (5 ended normally, 0 errored, 0 unfinished)"
    assert fingerprint(finished) == original, "resuming the copy changed the original folder"
    folders = load_search(copy).trials
    assert len(folders) == 5 and all(t.path and t.path.parent == copy and t.rows and t.checkpoints() for t in folders)
    assert [t.state.is_finished() for t in study_trials(copy)] == [True] * 5


def test_a_moved_search_resumes_in_its_new_place_when_its_first_folder_is_gone(tmp_path):
    first = tmp_path / "first"
    proc = search([str(TINY), "--name", "first", "--storage", str(tmp_path), "--set", "search.num_samples=2",
                   *SMALL], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    moved = tmp_path / "elsewhere" / "second"
    moved.parent.mkdir()
    first.rename(moved)
    proc = search(["--resume", str(moved), "--more", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary_counts(moved) == "trials: 3 of 3 (3 ended normally, 0 errored, 0 unfinished)"
    assert not first.exists(), "the resume wrote into the folder the search was first started in"
    assert all(t.path.parent == moved and t.rows for t in load_search(moved).trials)


# ---------------------------------------------------------------- killed before Tune saved anything

def test_a_search_killed_before_tune_saved_its_first_state_starts_again_on_resume(tmp_path):
    """What a kill during Ray's start leaves: the spec copy (and the lock file), no Tune state. Neither a new
    search (the folder holds one) nor Tune's restore (nothing to restore) could go on from there."""
    folder = tmp_path / "early"
    folder.mkdir()
    spec = load_spec(TINY, ["search.num_samples=2", "training.epochs=1", "search.asha.grace_period=1"])
    (folder / SPEC_FILE).write_text(json.dumps({**spec.to_dict(), "_spec_name": "tiny"}))
    proc = search(["--resume", str(folder)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting it again" in proc.stderr
    assert summary_counts(folder) == "trials: 2 of 2 (2 ended normally, 0 errored, 0 unfinished)"


# ---------------------------------------------------------------- a trial known only by its checkpoint

def forget_in_ray_state(experiment: Path, trial_id: str) -> None:
    """Drop a trial from Tune's experiment state, as a kill before Tune saved it leaves it."""
    for state_file in experiment.glob("experiment_state-*.json"):
        state = json.loads(state_file.read_text())
        state["trial_data"] = [e for e in state["trial_data"] if json.loads(e[0])["trial_id"] != trial_id]
        state_file.write_text(json.dumps(state))


def test_a_trial_folder_with_only_its_checkpoints_counts_for_summary_report_export_and_the_study(tiny_search,
                                                                                                   tmp_path):
    experiment = tmp_path / "checkpoints-only"
    shutil.copytree(tiny_search, experiment, ignore=shutil.ignore_patterns("wandb", "report", "export"))
    before = load_search(experiment)
    trial, best = before.best_checkpoint()
    for name in ("params.json", "params.pkl", "result.json", "progress.csv"):
        (trial.path / name).unlink(missing_ok=True)
    forget_in_ray_state(experiment, trial.trial_id)

    after = load_search(experiment)
    (found,) = [t for t in after.trials if t.trial_id == trial.trial_id]
    assert found.params == trial.params and found.path == trial.path
    assert after.best_checkpoint()[1].path == best.path
    from tune_llama.summary import summary_lines
    assert any(trial.trial_id in line for line in summary_lines(after)[0]), "the summary's best trial is another"
    report = subprocess.run([sys.executable, "-m", "tune_llama.report", str(experiment)], capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0 and trial.trial_id in (experiment / "report" / "trials.csv").read_text()
    export = subprocess.run([sys.executable, "-m", "tune_llama.export", str(experiment), "--by", "loss"],
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    assert json.loads((experiment / "export" / "export.json").read_text())["checkpoint"] == str(best.path)
    # the study rebuilt from the folders, on resume, holds it too
    (experiment / "optuna.db").unlink()
    proc = search(["--resume", str(experiment)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(before.trials)} trials restored" in (experiment / "summary.txt").read_text()
    assert trial.params in [{k: t.params[k] for k in trial.params} for t in study_trials(experiment)]


def test_reading_a_checkpoint_only_folder_takes_its_params_from_the_newest_checkpoint_spec(tiny_search, tmp_path):
    experiment = tmp_path / "read"
    shutil.copytree(tiny_search, experiment, ignore=shutil.ignore_patterns("wandb", "report", "export"))
    trial = load_search(experiment).trials[0]
    rows = read_result_rows(trial.path / "result.json")
    (trial.path / "params.json").unlink()
    (trial.path / "result.json").unlink()
    forget_in_ray_state(experiment, trial.trial_id)
    (again,) = [t for t in load_search(experiment).trials if t.trial_id == trial.trial_id]
    assert again.params == trial.params
    kept = {c.path.name for c in trial.checkpoints()}
    assert [r["step"] for r in again.rows] == [r["step"] for r in rows if r.get("checkpoint_dir_name") in kept]
