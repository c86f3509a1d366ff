"""A search killed anywhere resumes to an end where everything adds up: killed while trials wait at a rung,
and killed at random moments (``bench/chaos.py --smoke-test``, three kills). The invariants are the chaos
bench's (``bench/chaos.py``): one driver, no trial starting over, one state per trial, counts that add up,
the scheduler's and the study's records agreeing with the trial folders, export taking the best checkpoint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import NO_HOST_OOM_KILLS, REPO_ROOT, TINY, kill_session, popen_search, run_search, wait_until

CHAOS = REPO_ROOT / "bench" / "chaos.py"


def chaos():
    """bench/chaos.py as a module: its invariants."""
    sys.path.insert(0, str(CHAOS.parent))
    spec = importlib.util.spec_from_file_location("chaos", CHAOS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def waiting(experiment: Path):
    """A condition for ``wait_until``: a trial the halving scheduler holds at a rung, whose pause Tune saved."""
    def check():
        try:
            state = json.loads((experiment / "scheduler.json").read_text())
        except (OSError, ValueError):
            return None
        return next(iter(state.get("waiting", {})), None)
    return check


def test_a_search_killed_while_trials_wait_at_a_rung_resumes_and_everything_adds_up(tmp_path):
    experiment = tmp_path / "waiting"
    leader = popen_search([str(TINY), "--name", "waiting", "--storage", str(tmp_path), "--set", "search.num_samples=4",
                           "--set", "search.max_concurrent=1", "--set", "training.epochs=2",
                           "--set", "training.eval_every=0.5", "--set", "search.asha.grace_period=1"],
                          cwd=tmp_path, env_extra={**NO_HOST_OOM_KILLS, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        held = wait_until(waiting(experiment), leader, "a trial waiting at a rung")
        time.sleep(2.0)  # one more save of Tune's state, which then holds the pause
    finally:
        kill_session(leader)
    proc = run_search(["--resume", str(experiment)], cwd=tmp_path, env_extra=NO_HOST_OOM_KILLS)
    invariants = chaos()
    assert invariants.at_end(experiment, proc.returncode, tmp_path / "search.log") is None, (
        invariants.at_end(experiment, proc.returncode, tmp_path / "search.log"), proc.stderr[-3000:])
    assert held not in json.loads((experiment / "scheduler.json").read_text())["waiting"]


def test_three_kills_at_random_moments_are_all_survived(tmp_path):
    proc = subprocess.run([sys.executable, str(CHAOS), "--smoke-test", "--json", "--storage", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["failures"] == {} and found["survived"] == found["kills"] == 3, (found, proc.stderr[-3000:])
