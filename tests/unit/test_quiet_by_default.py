"""A quiet terminal by default: a train prints only its own progress (the libraries' noise comes back with
--verbose), and importing the package changes no warning or logging filter."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import TINY


def fresh_environment() -> dict[str, str]:
    """This process's environment without the switches an in-process command call set (``quiet_known_noise``):
    a subprocess then starts as a user's shell would start it."""
    from tune_llama.cli import PROGRESS_BAR_SWITCHES
    return {k: v for k, v in os.environ.items() if k not in PROGRESS_BAR_SWITCHES}


def train_stderr(tmp_path: Path, *extra: str) -> str:
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "tune_llama", "train", str(TINY), "--output", str(tmp_path / "run"),
                           "--set", "model.lora.enabled=true", "--set", "training.epochs=1",
                           "--set", "data.synthetic_size=24", "--set", "data.val_size=8", *extra],
                          capture_output=True, text=True, timeout=600, env=fresh_environment())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_a_lora_train_prints_only_its_own_progress_on_stderr_and_the_noise_with_verbose(tmp_path):
    quiet = train_stderr(tmp_path)
    assert [line for line in quiet.splitlines() if not line.startswith("train: ")] == []
    loud = train_stderr(tmp_path, "--verbose")
    assert "Writing model shards" in loud, "--verbose must bring the libraries' bars back"


def test_importing_the_package_installs_none_of_the_entry_points_filters():
    import subprocess
    import sys
    code = ("import warnings, logging, os; import tune_llama.train, tune_llama.export; "
            "print(not any(f[1] is not None and 'is_gradient_checkpointing' in f[1].pattern for f in warnings.filters),"
            " logging.getLogger('bitsandbytes.backends.cpu.ops').filters == [] "
            "and 'HF_HUB_DISABLE_PROGRESS_BARS' not in os.environ)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=fresh_environment()).stdout.split()
    assert out == ["True", "True"]
