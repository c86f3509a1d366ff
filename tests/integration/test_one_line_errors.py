"""Bad input is one line (exit 2) from both the single-run and the search command, a trial no node can hold is
one line and no endless pending search, and a search whose trials all fail says so in one line per trial."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import TINY, one_line_error, run_search
from tune_llama.__main__ import command
from tune_llama.trainable import OOM_ABOVE_ROWS


# ---------------------------------------------------------------- bad input: same line from train and search

def ray_started() -> bool:
    import ray
    return ray.is_initialized()


def both_commands_fail_alike(capsys, tmp_path: Path, spec: Path, overrides: list[str]) -> str:
    """The one-line error of ``train`` and of ``search`` for the same input; they must be equal, start no
    Ray and write nothing."""
    sets = [a for o in overrides for a in ("--set", o)]
    train_err = one_line_error(command("train"), [str(spec), "--output", str(tmp_path / "run"), *sets], capsys)
    search_err = one_line_error(command("search"), [str(spec), "--name", "s", "--storage", str(tmp_path / "searches"),
                                              *sets], capsys)
    assert train_err == search_err
    assert not ray_started()
    assert not (tmp_path / "run").exists() and not (tmp_path / "searches").exists()
    return train_err


def test_a_broken_line_in_local_train_data_is_the_same_one_line_error_from_train_and_search(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}'
    (data / "train.jsonl").write_text("\n".join([good] * 20 + ['{"question": "cut off', good]) + "\n")
    err = both_commands_fail_alike(capsys, tmp_path, TINY, [f"data.source={data}"])
    assert f"{data / 'train.jsonl'}:21" in err and "data.source" in err


def test_an_unknown_random_model_shape_is_the_same_one_line_error_from_train_and_search(capsys, tmp_path):
    err = both_commands_fail_alike(capsys, tmp_path, TINY, ["model.name=random:nope"])
    assert "model.name" in err and "random:nope" in err


def test_an_empty_spec_file_is_a_one_line_error_naming_the_file_and_model_name(capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    err = both_commands_fail_alike(capsys, tmp_path, empty, [])
    assert str(empty) in err and "model.name" in err


def test_a_spec_without_model_name_is_a_one_line_error_naming_model_name_and_the_file(capsys, tmp_path):
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text(re.sub(r"(?m)^model:\n  name: random:tiny\n", "", TINY.read_text()))
    assert "model:" not in nameless.read_text()
    err = both_commands_fail_alike(capsys, tmp_path, nameless, [])
    assert err.startswith("error: model.name") and str(nameless) in err


# ---------------------------------------------------------------- errors found once Ray runs

@pytest.fixture(scope="module")
def oversized_search(tmp_path_factory):
    """A search whose trials ask for more CPUs than any node has: (process, storage). An endless pending search
    would run into the timeout."""
    storage = tmp_path_factory.mktemp("oversized")
    proc = run_search([str(TINY), "--name", "huge", "--storage", str(storage),
                       "--set", "search.num_samples=2", "--set", "search.resources.cpu=64"], cwd=storage, timeout=120)
    return proc, storage


def test_a_trial_no_node_can_hold_is_a_one_line_error_and_not_an_endless_pending_search(oversized_search):
    proc, storage = oversized_search
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: search.resources") and "cpu=64" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list((storage / "huge").glob("*/params.json")), "a trial was started"


def test_a_search_refused_for_its_resources_leaves_no_folder_that_blocks_its_name(oversized_search):
    """Otherwise the same --name is refused ("already holds a search: resume it") and --resume is refused too
    ("not a tune-llama search folder"): the user must find and delete the folder by hand."""
    proc, storage = oversized_search
    assert proc.returncode == 2
    leftover = storage / "huge" / "tune_llama_spec.json"
    assert not leftover.exists(), f"{leftover} was left behind by a search that never started a trial"


def test_a_search_whose_every_trial_fails_at_runtime_exits_4_with_one_line_per_trial_and_no_traceback(tmp_path):
    # A "GPU" that holds no row (injected): every trial passes preflight and fails at its first step. (A setting
    # every trial refuses at setup, such as a LoRA target the model lacks, is refused by preflight instead.)
    proc = run_search([str(TINY), "--name", "allfail", "--storage", str(tmp_path),
                       "--set", "search.num_samples=2", "--set", "training.epochs=1", "--set", "search.max_failures=0"],
                      cwd=tmp_path, timeout=300, env_extra={OOM_ABOVE_ROWS: "0"})
    console = proc.stdout + proc.stderr
    assert proc.returncode == 4, console[-3000:]
    assert "Traceback" not in console and 'File "' not in console, console[-3000:]
    assert "error: every trial errored (2)" in proc.stderr
    message = "CUDA out of memory at data.batch_size=8, data.max_length=512: lower data.batch_size"
    lines = [line for line in console.splitlines() if message in line]
    assert len(lines) == 2, lines  # once per trial: no retry, no per-trial traceback echo
    experiment = tmp_path / "allfail"
    trials = sorted(p.parent for p in experiment.glob("*/params.json"))
    assert len(trials) == 2
    for trial in trials:
        error_file = trial / "error.txt"
        (line,) = [line for line in lines if str(error_file) in line]
        assert message in error_file.read_text().strip().splitlines()[-1]
        assert line.startswith("errored trial ")
