"""Fault injection on real searches: a killed trial worker, a damaged newest checkpoint on resume, a results
disk that fills up, and another Ray instance on the same machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import (TINY, cmdline, first_report, kill_session, popen_search, proc_stat, result_rows, run_search,
                      summary_counts, wait_until)
from tune_llama.ray_private import newest_state
from tune_llama.results import read_result_rows


# Two trials side by side, four reports (with checkpoints) in their one epoch, no ASHA stop before the end, and
# enough rows that a trial runs for some seconds after its first report: time to inject a fault mid-epoch.
LONG_ENOUGH = ["--set", "search.num_samples=2", "--set", "search.max_concurrent=2", "--set", "training.epochs=1",
               "--set", "training.eval_every=0.25", "--set", "search.asha.grace_period=1",
               "--set", "data.synthetic_size=400"]
REPORTS = 4
# Ray saves its experiment state (and the trials' result.json) into the search folder every 10 s at first;
# every second instead, so a test sees a report while the trial still runs.
FRESH_STATE = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}


def trial_folders(experiment: Path) -> list[Path]:
    return sorted(p.parent for p in experiment.glob("*/params.json"))


def reports(rows: list[dict]) -> list[int]:
    return [r["report"] for r in rows]


# ---------------------------------------------------------------- a trial worker is SIGKILLed

def test_a_killed_trial_worker_is_retried_from_its_last_checkpoint_and_the_search_finishes(tmp_path):
    experiment = tmp_path / "worker"
    leader = popen_search([str(TINY), "--name", "worker", "--storage", str(tmp_path), *LONG_ENOUGH,
                           "--set", "search.max_failures=1", "--set", "training.log_every=1"],
                          cwd=tmp_path, env_extra=FRESH_STATE)
    try:
        # A trial that reported (so checkpointed) well before its end, and whose checkpoint Tune holds.
        trial, pid = wait_until(first_report(experiment, 0.5, checkpoint_kept=True), leader,
                                "a trial's first kept checkpoint")
        # Only the search's own Ray worker: same session as the search, a Ray worker process title.
        assert proc_stat(pid)[1] == leader.pid and cmdline(pid).startswith("ray::"), cmdline(pid)
        os.kill(pid, signal.SIGKILL)
        code = leader.wait(timeout=300)
    finally:
        if leader.poll() is None:
            kill_session(leader)
    log = (tmp_path / "search.log").read_text()
    assert code == 0, log[-3000:]
    assert "2 ended normally, 0 errored" in summary_counts(experiment)
    rows = result_rows(experiment)
    assert len(rows) == 2 and all(r[-1]["epoch"] == 1 for r in rows.values()), {k: reports(v) for k, v in rows.items()}
    killed = rows[trial]
    before = [r for r in killed if r["pid"] == pid]
    after = [r for r in killed if r["pid"] != pid]
    assert before and after, f"the trial never ran in another worker: pids {[r['pid'] for r in killed]}"
    assert killed[:len(before)] == before, "the killed worker reported after its retry began"
    # Continued from the last checkpoint: each report once, none from report 1 again.
    assert reports(killed) == list(range(1, REPORTS + 1)), reports(killed)
    assert after[0]["report"] == before[-1]["report"] + 1


# ---------------------------------------------------------------- the newest checkpoint is damaged on resume

def resume_points(experiment: Path) -> dict[str, dict]:
    """Per trial id, what a resume will hand back, from Ray's newest experiment state (a Ray internal, see
    ``tune_llama.ray_private``): the trial folder, its last result's checkpoint folder name and ``done``."""
    newest = newest_state(experiment)  # by name, as Ray picks it: a resumed search may touch an older one last
    try:
        entries = [(json.loads(t), json.loads(r)) for t, r in json.loads(newest.read_text())["trial_data"]]
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return {}  # none yet, or being written
    out = {}
    for trial, runtime in entries:
        last = runtime.get("last_result") or {}
        if trial.get("relative_logdir") and last.get("checkpoint_dir_name"):
            out[trial["trial_id"]] = {"folder": experiment / trial["relative_logdir"], "done": bool(last.get("done")),
                                      "checkpoint": last["checkpoint_dir_name"], "epoch": last.get("epoch", 0)}
    return out


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_when_a_killed_search_resumes(tmp_path):
    experiment = tmp_path / "damaged"
    # keep_checkpoints above the report count: Ray deletes none, so the older checkpoint is certainly there.
    leader = popen_search([str(TINY), "--name", "damaged", "--storage", str(tmp_path), *LONG_ENOUGH,
                           "--set", f"search.keep_checkpoints={REPORTS + 2}"], cwd=tmp_path, env_extra=FRESH_STATE)
    try:
        wait_until(lambda: any(p["checkpoint"] >= "checkpoint_000001" and not p["done"] and p["epoch"] <= 0.75
                               for p in resume_points(experiment).values()), leader, "a second checkpoint")
    finally:
        kill_session(leader)
    points = resume_points(experiment)
    candidates = [p for p in points.values() if p["checkpoint"] >= "checkpoint_000001" and not p["done"]]
    assert candidates, f"no unfinished trial with two checkpoints to damage: {points}"
    target = candidates[0]
    newest = target["folder"] / target["checkpoint"]
    previous = target["folder"] / f"checkpoint_{int(target['checkpoint'].split('_')[1]) - 1:06d}"
    assert (newest / "trainable.safetensors").is_file() and (previous / "metrics.json").is_file()
    weights = newest / "trainable.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    killed_pids = {r["pid"] for folder in trial_folders(experiment) for r in read_result_rows(folder / "result.json")}

    proc = run_search(["--resume", str(experiment)], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 ended normally, 0 errored" in summary_counts(experiment)
    rows = result_rows(experiment)
    assert all(r[-1]["epoch"] == 1 for r in rows.values()), {k: reports(v) for k, v in rows.items()}
    resumed = [r for r in rows[target["folder"].name] if r["pid"] not in killed_pids]
    assert resumed, "the damaged trial did not run again"
    restored_from = json.loads((previous / "metrics.json").read_text())["report"]
    assert resumed[0]["report"] == restored_from + 1, (
        f"resumed at report {resumed[0]['report']}, expected {restored_from + 1} (after {previous.name})")
    assert resumed[-1]["report"] == REPORTS


# ---------------------------------------------------------------- the results disk fills up

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only); unmounted afterwards whatever happens."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        reason = f"cannot mount a tmpfs ({(mount.stderr or mount.stdout).strip()}): needs root"
        print(reason)
        pytest.skip(reason)
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_results_disk_is_a_clear_error_keeps_earlier_checkpoints_and_resumes_once_there_is_room(
        tmp_path, small_disk):
    from safetensors.torch import load_file
    import torch

    # AdamW checkpoints are ~1.1 MB each and none is deleted: the third does not fit in 3 MB.
    spec_args = ["--set", "search.num_samples=1", "--set", "training.epochs=1", "--set", "training.eval_every=0.25",
                 "--set", "search.asha.grace_period=1", "--set", f"search.keep_checkpoints={REPORTS + 2}",
                 "--set", "search.max_failures=0", "--set", "training.optimizer=adamw",
                 "--set", "search.space={training.lr: {loguniform: [1.0e-4, 3.0e-2]}}"]
    proc = run_search([str(TINY), "--name", "full", "--storage", str(small_disk), *spec_args], cwd=tmp_path,
                      timeout=240)
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0, console[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no space left" in last.lower() and str(small_disk) in last, (
        f"not a clear last line: {last!r}")

    experiment = small_disk / "full"
    (trial,) = trial_folders(experiment)
    # The checkpoint being written when the disk filled may be partial; every one before it is whole.
    *whole, _being_written = sorted(trial.glob("checkpoint_*"))
    assert whole, f"not even one checkpoint fitted: {sorted(p.name for p in trial.iterdir())}"
    for folder in whole:
        metrics = json.loads((folder / "metrics.json").read_text())
        assert load_file(folder / "trainable.safetensors")
        torch.load(folder / "optimizer.pt", weights_only=False)
        assert torch.load(folder / "state.pt", weights_only=False)["step"] == metrics["step"]

    unreadable = [p.name for p in experiment.glob("experiment_state-*.json") if not parses(p)]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = run_search(["--resume", str(experiment)], cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, f"Ray state the full disk cut short: {unreadable}\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert trial_folders(experiment) == [trial], "the resume started the trial over as a new one"
    rows = result_rows(experiment)[trial.name]
    assert rows[-1]["report"] == REPORTS and rows[-1]["epoch"] == 1, reports(rows)
    assert "1 ended normally, 0 errored" in summary_counts(experiment)


def parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- another Ray instance on the machine

def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class OtherRay:
    """A ``ray start --head`` of someone else's: its own temp dir and ports, no CPUs (a search that joined it
    could place no trial). Stopped by its own processes only: its session and its temp dir."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        log = temp_dir.parent / "ray-start.log"
        gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, node_manager = free_ports(7)
        self.starter = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--temp-dir={temp_dir}", f"--port={gcs}",
             f"--dashboard-port={dashboard}", "--include-dashboard=false", "--num-cpus=0",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             f"--node-manager-port={node_manager}", "--disable-usage-stats"],
            # A file, not a pipe: the daemons it leaves running inherit its output.
            cwd=temp_dir.parent, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        if self.starter.wait(timeout=120) != 0:
            self.stop()
            pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
        self.address = (temp_dir / "ray_current_cluster").read_text().strip()

    def processes(self) -> dict[int, str]:
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            pid = int(stat.parent.name)
            try:
                state, session = proc_stat(pid)
                command = cmdline(pid)
            except (OSError, IndexError, ValueError):
                continue
            if state not in "ZX" and (session == self.starter.pid or str(self.temp_dir) in command):
                found[pid] = command
        return found

    def is_alive(self) -> bool:
        """Its GCS answers on its port, and its GCS server and raylet processes run."""
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as s:
            s.settimeout(5)
            if s.connect_ex((host, int(port))) != 0:
                return False
        commands = self.processes().values()
        return all(any(f"/{daemon} " in c for c in commands) for daemon in ("gcs_server", "raylet"))

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                wait_until(lambda: not self.processes(), what="the other Ray's processes to end", timeout=grace)
            except AssertionError:  # the next, harder signal follows
                pass


@pytest.fixture
def short_tmp():
    """A short folder in /tmp: Ray's socket paths under it must stay within the 107-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def search_beside(other: OtherRay, tmp_path: Path, env_extra: dict | None = None) -> None:
    proc = run_search([str(TINY), "--name", "beside", "--storage", str(tmp_path), "--set", "search.num_samples=1",
                       "--set", "training.epochs=1"], cwd=tmp_path, env_extra=env_extra, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 ended normally, 0 errored" in summary_counts(tmp_path / "beside")
    assert other.is_alive(), "the other Ray instance did not survive the search"


def test_a_search_runs_beside_another_ray_instance_in_its_own_temp_dir_and_leaves_it_running(tmp_path, short_tmp):
    other = OtherRay(short_tmp / "ray-other")
    try:
        assert other.is_alive()
        search_beside(other, tmp_path)
    finally:
        other.stop()
    assert not other.processes()


def test_a_search_starts_its_own_ray_even_where_ray_start_registered_a_cluster_in_the_default_temp_dir(
        tmp_path, short_tmp):
    """``ray start --head`` writes its address into ``$TMPDIR/ray/ray_current_cluster``, where a plain
    ``ray.init()`` looks first: a search must not join that cluster (someone else's, here without CPUs).
    TMPDIR keeps this default temp dir private to the test."""
    other = OtherRay(short_tmp / "ray")
    try:
        search_beside(other, tmp_path, env_extra={"TMPDIR": str(short_tmp)})
    finally:
        other.stop()
    assert not other.processes()
