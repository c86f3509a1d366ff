"""CUDA out of memory in a search, injected on CPU: the trial whose batch cannot fit ends with one line naming
the field to lower, the others go on, and the search names the errored trial."""

from __future__ import annotations

import yaml

from conftest import TINY, run_search
from tune_llama.results import ERRORED, load_search
from tune_llama.trainable import OOM_ABOVE_ROWS


def test_a_trial_out_of_memory_errors_with_one_line_naming_the_field_and_the_others_finish(tmp_path):
    spec = yaml.safe_load(TINY.read_text())
    spec["training"]["epochs"] = 1
    # Three trials may draw batch 16 and fail alike: the same-error stop (test_same_error_stops_the_search.py)
    # is off here.
    spec["search"].update(num_samples=4, sampler="random", max_failures=0, stop_after_same_error=0, space={
        "training.lr": {"loguniform": [1.0e-3, 1.0e-2]}, "data.batch_size": {"choice": [4, 16]}})
    (tmp_path / "oom.yaml").write_text(yaml.safe_dump(spec))
    # The injected "GPU" holds 8 rows: batch_size 16 cannot fit, 4 can.
    proc = run_search([str(tmp_path / "oom.yaml"), "--name", "oom", "--storage", str(tmp_path)], cwd=tmp_path,
                      env_extra={OOM_ABOVE_ROWS: "8"})
    console = proc.stdout + proc.stderr
    search = load_search(tmp_path / "oom")
    too_big = [t for t in search.trials if t.params["data.batch_size"] == 16]
    fits = [t for t in search.trials if t.params["data.batch_size"] == 4]
    assert too_big and fits and len(search.trials) == 4, [t.params for t in search.trials]
    assert proc.returncode == 0, console[-3000:]
    assert f"warning: {len(too_big)} of 4 trials errored" in proc.stderr
    assert all(search.status(t) == ERRORED for t in too_big)
    assert all(search.status(t) != ERRORED and t.epochs == 1 for t in fits)
    summary = (tmp_path / "oom" / "summary.txt").read_text().splitlines()
    for trial in too_big:
        line = next(line for line in summary if line.startswith(f"errored trial {trial.trial_id}: "))
        assert "CUDA out of memory at data.batch_size=16" in line and "lower data.batch_size" in line, line
        assert "Traceback" not in line and "injected" not in line, line
