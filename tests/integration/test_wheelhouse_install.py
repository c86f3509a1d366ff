"""`tune-llama wheelhouse` with pip reaching the package index: an excluded package is named, and a wheelhouse built
for this machine installs into a fresh venv without an index and runs a search there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY, one_line_error
from tune_llama.__main__ import main


PIP_QUIET = ["--disable-pip-version-check", "-q"]


def test_excluding_a_package_tune_llama_does_not_need_is_named(tmp_path, capsys):
    # Resolves for real (pip reaches the index here; its cache makes this quick).
    (tmp_path / "present.txt").write_text(subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"],
                                                         capture_output=True, text=True, check=True).stdout)
    err = one_line_error(main, ["wheelhouse", str(tmp_path / "wh"), "--present", str(tmp_path / "present.txt"),
                                "--exclude", "wandbb"], capsys)
    assert "--exclude wandbb: not among the packages" in err


# ---------------------------------------------------------------- the round trip

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def test_a_wheelhouse_for_this_machine_installs_offline_into_a_fresh_venv_and_runs_a_search(tmp_path):
    """The target: a fresh venv holding torch alone (as the GPU image holds its own torch); its freeze is
    the --present list. After an install with --no-index from the wheelhouse, tune-llama and the trimmed
    Ray come from that venv and a 2-trial search runs there."""
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv_python(venv))
    # This machine's torch build (a local CPU wheel here), not the index's multi-GB CUDA one.
    torch_version = __import__("torch").__version__
    subprocess.run([python, "-m", "pip", "install", *PIP_QUIET, f"torch=={torch_version}"], check=True, env=clean_env)
    present = tmp_path / "present.txt"
    present.write_text(subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                                      text=True, check=True, env=clean_env).stdout)
    house = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "tune_llama", "wheelhouse", str(house), "--present", str(present),
                            "--trim", "--exclude", "wandb", "--exclude", "bitsandbytes", "--split", "60"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = {p.name.split("-")[0].lower() for p in house.glob("*/*.whl")}
    assert all(sum(w.stat().st_size for w in part.glob("*.whl")) <= 60 * 2**20 for part in house.iterdir())
    assert {"tune_llama", "ray", "optuna", "transformers"} <= wheels
    assert not wheels & {"torch", "wandb", "bitsandbytes"}, wheels
    install = next(line.strip() for line in built.stdout.splitlines() if "--no-index" in line)
    assert install == f"python -m pip install --no-index --no-deps {house}/*/*.whl"
    # The printed command, run as printed (the shell expands the glob) with the target's python.
    proc = subprocess.run(install.replace("python", python, 1) + " --disable-pip-version-check -q", shell=True,
                          capture_output=True, text=True, env=clean_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = subprocess.run([python, "-c", "import tune_llama, ray, pathlib; print(tune_llama.__file__); "
                            "print(pathlib.Path(ray.__file__).parent)"], capture_output=True, text=True,
                           cwd=tmp_path, env=clean_env, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    assert not (Path(where[1]) / "jars").exists() and not (Path(where[1]) / "rllib").exists()
    # Only the excluded packages are missing from what pip check finds.
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, env=clean_env).stdout
    assert all("wandb" in line or "bitsandbytes" in line for line in check.splitlines()), check
    search = subprocess.run([str(venv / "bin" / "tune-llama"), "search", str(TINY), "--name", "offline",
                             "--storage", str(tmp_path), "--set", "search.num_samples=2",
                             "--set", "training.epochs=1", "--set", "search.max_concurrent=2"],
                            capture_output=True, text=True, cwd=tmp_path, env=clean_env, timeout=400)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    summary = (tmp_path / "offline" / "summary.txt").read_text()
    assert "trials: 2 of 2 (2 ended normally, 0 errored" in summary, summary
