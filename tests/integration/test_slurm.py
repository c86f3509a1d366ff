"""The Slurm scripts, against a real Slurm: a private two-node cluster on loopback (tests/integration/slurm_cluster.py).

The search is the real one (`search_spaces/tiny.yaml`, made smaller with --set). Needs root and
Debian's slurm-wlm, munge and shellcheck, installed with apt when missing; when that is impossible
the tests fail with the reason, they are never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import wait_until
from slurm_cluster import SlurmCluster, ensure_packages, free_port


REPO = Path(__file__).resolve().parents[2]
SINGLE = REPO / "slurm" / "tune_single_node.sbatch"
MULTI = REPO / "slurm" / "tune_multi_node.sbatch"
TINY = "search_spaces/tiny.yaml"
SMALL = ["--set", "search.num_samples=2", "--set", "training.epochs=1", "--set", "data.synthetic_size=48"]
JOB_TIMEOUT = 420
# The jobs use the Python that runs the tests: its virtual environment, else the python on PATH.
VENV = sys.prefix if Path(sys.prefix, "bin", "activate").is_file() else ""


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def slurm_packages() -> None:
    ensure_packages()


@pytest.fixture(scope="module")
def slurm(slurm_packages, tmp_path_factory) -> SlurmCluster:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, gpus=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ray_tmp() -> Path:
    """Ray's per-job temp folders: short (Ray's socket paths must stay < 108 characters) and ours alone."""
    path = Path(tempfile.mkdtemp(prefix="tlray", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def other_ray(tmp_path):
    """Another Ray on this machine for the test's duration, as shared nodes often have one (another
    user's): `ray start --head` with its own temp folder and ports, left with `ray start`'s default
    worker ports (10002-19999). Stopped through its own process only, never a blanket `ray stop`."""
    temp = Path(tempfile.mkdtemp(prefix="tlother", dir="/tmp"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TUNE_", "RAY_"))},
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    address = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "other-ray.log", "w")
    proc = subprocess.Popen([str(Path(sys.prefix, "bin", "ray")), "start", "--head", "--block", f"--temp-dir={temp}",
                             "--node-ip-address=127.0.0.1", f"--port={address.split(':')[1]}", "--num-cpus=1",
                             f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # ray_current_cluster is written once its GCS and raylet run.
        wait_until(lambda: (temp / "ray_current_cluster").exists(), proc, "the other Ray to start", timeout=120,
                   interval=0.5, detail=lambda: (tmp_path / "other-ray.log").read_text())
        yield address, proc, temp, env
    finally:
        proc.terminate()  # `ray start --block` stops its own processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for line in ray_processes(temp):
            os.kill(int(line.split(":")[0]), 9)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def ray_daemons(temp: Path) -> set[str]:
    """The pids of the GCS and raylet of the Ray whose temp folder is ``temp``."""
    pids = set()
    for line in ray_processes(temp):
        pid, command = line.split(": ", 1)
        if Path(command.split()[0]).name in ("gcs_server", "raylet"):
            pids.add(pid)
    return pids


def job_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    # TUNE_ALLOW_NO_CUDA: the test cluster's GPUs are /dev/null, which no torch can use.
    return {"TUNE_VENV": VENV, "RAY_TMPDIR": str(ray_tmp), "RAY_DASHBOARD": "false",
            "RAY_START_TIMEOUT": "240", "WANDB_MODE": "offline", "TUNE_ALLOW_NO_CUDA": "1", **extra}


# ---------------------------------------------------------------- reading a search folder

def trial_rows(experiment: Path) -> dict[str, list[dict]]:
    """Every trial folder's result.json rows, by trial folder."""
    rows = {}
    for result in experiment.glob("*/result.json"):
        rows[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return rows


def trial_statuses(experiment: Path) -> list[str]:
    from ray.tune import ExperimentAnalysis
    return [trial.status for trial in ExperimentAnalysis(str(experiment)).trials]


def ray_processes(ray_tmp: Path) -> list[str]:
    """Processes whose command line names this test's Ray temp folder (Ray nodes of its jobs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(ray_tmp) in cmdline:
                found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def assert_ray_gone(ray_tmp: Path, within: float = 20) -> None:
    wait_until(lambda: not ray_processes(ray_tmp), what="the job's Ray processes to end (it left them behind)",
               timeout=within, interval=1, detail=lambda: "\n".join(ray_processes(ray_tmp)))


def describe(job) -> str:
    return f"job {job.id} {job.state} exit {job.exit_code}; output:\n{job.output[-6000:]}"


# ---------------------------------------------------------------- real Slurm

def test_single_node_job_runs_the_whole_search_on_what_slurm_granted(slurm, tmp_path, ray_tmp):
    job_id = slurm.submit(SINGLE, [TINY, "--name", "single", *SMALL], ["--cpus-per-task=2", "--gpus-per-node=1"],
                          job_env(ray_tmp, TUNE_RESULTS=str(tmp_path / "results")), cwd=REPO)
    job = slurm.wait_job(job_id, JOB_TIMEOUT)

    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), describe(job)
    # Ray got exactly the job's 2 CPUs and its 1 GPU (a GRES the test cluster backs with /dev/null).
    assert "resources: CPU=2 GPU=1" in job.output, describe(job)
    experiment = tmp_path / "results" / "single"
    assert trial_statuses(experiment) == ["TERMINATED"] * 2, describe(job)
    assert all(rows and rows[-1]["epoch"] >= 1 for rows in trial_rows(experiment).values())
    assert_ray_gone(ray_tmp)


def test_a_job_leaves_another_ray_on_the_node_alone(slurm, tmp_path, ray_tmp, other_ray):
    address, proc, other_temp, other_env = other_ray
    others = ray_daemons(other_temp)
    assert len(others) == 2, ray_processes(other_temp)

    job = slurm.wait_job(slurm.submit(SINGLE, [TINY, "--name", "beside", *SMALL, "--set", "search.num_samples=1"],
                                      ["--cpus-per-task=2"], job_env(ray_tmp, TUNE_RESULTS=str(tmp_path / "results")),
                                      cwd=REPO), JOB_TIMEOUT)

    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), describe(job)
    # The job's own cluster (2 CPUs), not the other one (1 CPU).
    assert "resources: CPU=2 " in job.output, describe(job)
    assert trial_statuses(tmp_path / "results" / "beside") == ["TERMINATED"], describe(job)
    assert_ray_gone(ray_tmp)
    # The other Ray runs on: the same GCS and raylet processes, and its GCS answers.
    assert proc.poll() is None, (tmp_path / "other-ray.log").read_text()[-3000:]
    assert ray_daemons(other_temp) == others
    health = subprocess.run([str(Path(sys.prefix, "bin", "ray")), "health-check", "--address", address],
                            env=other_env, capture_output=True, text=True, timeout=60)
    assert health.returncode == 0, health.stdout + health.stderr


def test_a_search_stopped_by_sigterm_is_finished_by_resubmitting_with_resume(slurm, tmp_path, ray_tmp):
    results = tmp_path / "results"
    experiment = results / "walltime"
    env = job_env(ray_tmp, TUNE_RESULTS=str(results))
    # Long enough that the signal lands mid-search: trials reuse their process, so a small search
    # ends within the second or two the signal takes to arrive. No early stop (grace period = epochs):
    # about three epochs' work, 10 s here, remain after the first report.
    args = [TINY, "--name", "walltime", "--set", "search.num_samples=3", "--set", "training.epochs=3",
            "--set", "data.synthetic_size=400", "--set", "search.asha.grace_period=3"]
    first = slurm.submit(SINGLE, args, ["--cpus-per-task=2"], env, cwd=REPO)

    # Mid-search (a trial has reported), the wall-time warning: SIGTERM to the batch shell only,
    # as `#SBATCH --signal=B:TERM@...` sends it.
    wait_until(lambda: any(trial_rows(experiment).values()), what="a trial's first report", timeout=JOB_TIMEOUT,
               interval=1, detail=lambda: slurm.job_output(first)[-4000:])
    slurm.run(["scancel", "--batch", "--signal=TERM", first])
    stopped = slurm.wait_job(first, JOB_TIMEOUT)

    assert "got SIGTERM" in stopped.output, describe(stopped)
    # The search exited by itself after saving, not killed by the signal (exit status >= 128).
    assert int(stopped.exit_code.split(":")[0]) < 128, "the search died of the signal: " + describe(stopped)
    statuses = trial_statuses(experiment)
    assert statuses.count("TERMINATED") < 3, f"the search finished before the signal: {statuses}"
    assert_ray_gone(ray_tmp)

    second = slurm.wait_job(slurm.submit(SINGLE, [*args, "--resume"], ["--cpus-per-task=2"], env, cwd=REPO),
                            JOB_TIMEOUT)

    assert (second.state, second.exit_code) == ("COMPLETED", "0:0"), describe(second)
    assert trial_statuses(experiment) == ["TERMINATED"] * 3, describe(second)


def test_multi_node_job_places_trials_on_every_node(slurm, tmp_path, ray_tmp):
    # One CPU per node and two concurrent one-CPU trials: each node must take one.
    # Both "nodes" are this machine, so the local results folder is shared after all.
    # The spec and the search's arguments come from the environment this time.
    env = job_env(ray_tmp, TUNE_RESULTS=str(tmp_path / "results"), TUNE_ALLOW_LOCAL_RESULTS="1", TUNE_SPEC=TINY,
                  TUNE_NAME="multi", TUNE_SEARCH_ARGS=" ".join([*SMALL, "--set", "search.max_concurrent=2"]))
    sbatch = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=1"]
    job = slurm.wait_job(slurm.submit(MULTI, [], sbatch, env, cwd=REPO), JOB_TIMEOUT)

    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), describe(job)
    assert "resources: CPU=2 GPU=2" in job.output, describe(job)
    experiment = tmp_path / "results" / "multi"
    assert trial_statuses(experiment) == ["TERMINATED"] * 2, describe(job)
    node_ips = {row["node_ip"] for rows in trial_rows(experiment).values() for row in rows}
    # tl2's NodeAddr is 127.0.0.2; tl1's 127.0.0.1, which Ray replaces with the machine's address.
    assert len(node_ips) == 2 and "127.0.0.2" in node_ips, describe(job)
    assert_ray_gone(ray_tmp)


# ---------------------------------------------------------------- bad input: one line, no hang

def run_script(script: Path, args: list[str], cwd: Path = REPO, timeout: float = 120, **env: str):
    """The script run by bash outside Slurm, with none of this process's Slurm variables."""
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=outside_slurm(**env), capture_output=True,
                          text=True, timeout=timeout)


def outside_slurm(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TUNE_", "RAY_"))}
    return {**clean, "TUNE_VENV": VENV, **env}


def assert_one_line_error(done, *words: str) -> None:
    lines = done.stderr.splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (done.returncode, done.stderr)
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=["single", "multi"])
def test_no_spec_is_one_line_error(script):
    # The search's own message: the scripts leave their arguments to it (--print-experiment).
    assert_one_line_error(run_script(script, []), "give a spec")


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=["single", "multi"])
def test_missing_spec_file_is_one_line_error(script):
    assert_one_line_error(run_script(script, ["search_spaces/nope.yaml"]), "search_spaces/nope.yaml")


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=["single", "multi"])
def test_missing_venv_is_one_line_error(script, tmp_path):
    done = run_script(script, [TINY], TUNE_VENV=str(tmp_path / "no-venv"))
    assert_one_line_error(done, str(tmp_path / "no-venv"))


def test_resume_of_a_search_that_does_not_exist_is_one_line_error(tmp_path):
    done = run_script(SINGLE, [TINY, "--name", "never-ran", "--resume"], TUNE_RESULTS=str(tmp_path))
    assert_one_line_error(done, str(tmp_path / "never-ran"))


def test_node_local_results_on_more_than_one_node_is_one_line_error():
    # /dev/shm is tmpfs on every Linux: what a results folder on one node's own disk looks like.
    done = run_script(MULTI, [TINY], SLURM_JOB_NUM_NODES="2", TUNE_RESULTS="/dev/shm/tune-llama-results")
    assert_one_line_error(done, "tmpfs", "shared")


def test_multi_node_script_outside_slurm_is_one_line_error():
    assert_one_line_error(run_script(MULTI, [TINY]), "sbatch")


def test_a_ray_head_that_does_not_come_up_in_time_is_one_line_error(tmp_path, ray_tmp):
    # A head stopped mid-start-up may sit out the stop timeout before it is killed: 20 s of the 60 allowed.
    done = run_script(SINGLE, [TINY, "--storage", str(tmp_path)], RAY_START_TIMEOUT="1", RAY_STOP_TIMEOUT="20",
                      RAY_TMPDIR=str(ray_tmp), timeout=60)

    assert_one_line_error(done, "did not come up within 1s")
    assert_ray_gone(ray_tmp)


def test_sigterm_while_ray_starts_ends_the_job_at_once_and_leaves_no_ray(tmp_path, ray_tmp):
    proc = subprocess.Popen(["bash", str(SINGLE), TINY, "--storage", str(tmp_path)], cwd=REPO,
                            env=outside_slurm(RAY_TMPDIR=str(ray_tmp), RAY_DASHBOARD="false"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: ray_processes(ray_tmp), proc, "the Ray head to start", timeout=60,
                   detail=lambda: "".join(proc.communicate()) if proc.poll() is not None else "")
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + 15, out
    assert "got SIGTERM before the search started" in out
    assert_ray_gone(ray_tmp)


def test_shellcheck_passes_on_every_script(slurm_packages):
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 4
    done = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
