"""Traps of a first cluster run that the Slurm scripts catch before any Ray starts, without Slurm.

The checkout's .venv (what `make venv` builds, the scripts' default environment) has the CPU
torch: on a GPU job every trial would train on the CPU. slurm/prepare.sh's require_cuda stops such
a job with one line. Here it runs in bash with the variables Slurm sets for a GPU job, against the
python that runs the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PYTHON_BIN = Path(sys.executable).parent
VENV = sys.prefix if Path(sys.prefix, "bin", "activate").is_file() else ""
# What require_cuda must say of the torch that runs the tests: nothing (it can use a GPU), or why not.
VERDICT = None if torch.cuda.is_available() else "a CPU build" if torch.version.cuda is None else "sees none"


def bare_env(python_bin: Path = PYTHON_BIN, **env: str) -> dict[str, str]:
    """This process's environment without Slurm's, Ray's, tune-llama's or CUDA's variables; python_bin first on PATH."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TUNE_", "RAY_")) and k != "CUDA_VISIBLE_DEVICES"}
    return {**clean, "PATH": f"{python_bin}:{clean.get('PATH', '')}", **env}


def require_cuda(python_bin: Path = PYTHON_BIN, **env: str) -> subprocess.CompletedProcess:
    script = 'source slurm/common.sh && source slurm/prepare.sh && require_cuda && echo passed'
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=bare_env(python_bin, **env), capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (done.returncode, done.stderr)
    for word in words:
        assert word in lines[0], lines[0]


GPU_JOBS = {
    "slurm count": {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "2"},
    "slurm devices": {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"},
    "devices outside slurm": {"CUDA_VISIBLE_DEVICES": "0,1"},
}


@pytest.mark.parametrize("gpus", GPU_JOBS.values(), ids=GPU_JOBS.keys())
def test_a_gpu_job_whose_torch_cannot_use_cuda_stops_with_one_line_naming_python_torch_and_the_fix(gpus):
    done = require_cuda(**gpus)
    if VERDICT is None:  # a machine with a usable GPU: the check lets it through
        assert (done.returncode, done.stdout, done.stderr) == (0, "passed\n", "")
        return
    assert_one_line_error(done, f"{PYTHON_BIN / 'python'} ", f"torch {torch.__version__}", VERDICT,
                          "pip install torch --index-url https://download.pytorch.org/whl/cu", "TUNE_VENV",
                          "docs/first-cluster-run.md")


NO_GPU_JOBS = {
    "outside slurm": {},
    "slurm without gpus": {"SLURM_JOB_ID": "7"},
    "slurm zero gpus": {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"},
    "no device files": {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "NoDevFiles"},
    "ray given no gpus": {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "2", "RAY_NUM_GPUS": "0"},
    "allowed": {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "2", "TUNE_ALLOW_NO_CUDA": "1"},
}


@pytest.mark.parametrize("env", NO_GPU_JOBS.values(), ids=NO_GPU_JOBS.keys())
def test_a_job_without_gpus_for_ray_or_allowed_without_cuda_passes_silently(env):
    done = require_cuda(**env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "passed\n", "")


def test_a_gpu_job_whose_python_has_no_torch_at_all_names_that_python(tmp_path):
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(tmp_path / "bare")],
                   check=True, timeout=120)
    done = require_cuda(tmp_path / "bare" / "bin", CUDA_VISIBLE_DEVICES="0")
    assert_one_line_error(done, f"{tmp_path / 'bare' / 'bin' / 'python'} cannot import torch", "TUNE_VENV")


@pytest.mark.parametrize("script", ["tune_single_node.sbatch", "tune_multi_node.sbatch"])
def test_the_batch_scripts_stop_a_gpu_job_on_a_cpu_torch_before_ray_starts(script):
    assert VERDICT, "this torch can use a GPU: the test needs one that cannot (the CPU torch of make venv)"
    done = subprocess.run(["bash", f"slurm/{script}", "search_spaces/tiny.yaml"], cwd=REPO,
                          env=bare_env(TUNE_VENV=VENV, CUDA_VISIBLE_DEVICES="0"), capture_output=True, text=True,
                          timeout=120)
    assert_one_line_error(done, VERDICT, "docs/first-cluster-run.md")
    assert "Ray" not in done.stdout
