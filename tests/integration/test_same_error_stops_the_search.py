"""Trials failing the same way stop the search: one line naming the error and the trials' error files, the
exit code for errored trials, and no Ray stack on the terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import NO_HOST_OOM_KILLS, TINY, run_search
from tune_llama.model import load_model, load_tokenizer, save_hf_model
from tune_llama.summary import EXIT_ALL_ERRORED
from tune_llama.spec import ModelSpec

ERROR = "SafetensorError: Error while deserializing header"


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory) -> Path:
    """A model folder whose config loads (so preflight passes) but whose weights are cut short: every trial
    fails the same way as it loads them."""
    spec = ModelSpec(name="random:tiny")
    tokenizer = load_tokenizer(spec)
    out = save_hf_model(load_model(spec, tokenizer, torch.device("cpu")), tokenizer,
                        tmp_path_factory.mktemp("model") / "broken")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return out


def search_with(broken_model: Path, tmp_path: Path, *sets: str):
    args = [str(TINY), "--name", "same", "--storage", str(tmp_path), "--set", f"model.name={broken_model}",
            "--set", "search.max_failures=0"]
    for item in sets:
        args += ["--set", item]
    return run_search(args, cwd=tmp_path, env_extra=NO_HOST_OOM_KILLS)


def test_three_trials_failing_the_same_way_stop_the_search_with_one_line(broken_model, tmp_path):
    proc = search_with(broken_model, tmp_path, "search.num_samples=8", "search.max_concurrent=1")
    assert proc.returncode == EXIT_ALL_ERRORED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 trials in a row failed the same way" in errors[0] and ERROR in errors[0], \
        proc.stderr[-3000:]
    experiment = tmp_path / "same"
    named = [Path(p) for p in errors[0].split("(full errors: ", 1)[1].rstrip(")").split(", ")]
    assert len(named) == 3 and all(p.parent.parent == experiment and p.name == "error.txt" for p in named)
    assert all(ERROR in p.read_text() for p in named)
    assert len(list(experiment.glob("*/params.json"))) < 8  # stopped, not run to num_samples


def test_stop_after_same_error_0_runs_every_trial(broken_model, tmp_path):
    proc = search_with(broken_model, tmp_path, "search.num_samples=4", "search.max_concurrent=2",
                       "search.stop_after_same_error=0")
    assert proc.returncode == EXIT_ALL_ERRORED, proc.stderr[-3000:]
    assert len(list((tmp_path / "same").glob("*/error.txt"))) == 4
    assert "in a row failed the same way" not in proc.stderr
