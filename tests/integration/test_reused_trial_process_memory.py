"""A trial process that Ray reuses for the next trial (``reuse_actors``) gives the ended trial's memory back,
and each trial's ``peak_memory_gb`` is its own peak, not the largest of every trial the process ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import NO_HOST_OOM_KILLS, TINY, result_rows, run_search

LARGE, SMALL = "random:smollm2-135m", "random:tiny"


@pytest.fixture(scope="module")
def large_then_small(tmp_path_factory) -> list[list[dict]]:
    """Two trials one after the other in one process: a full fine-tune of a random model of SmolLM2-135M's
    shape (about 3 GB), then the tiny model (a few hundred MB). Their result rows, in the order they ran."""
    storage = tmp_path_factory.mktemp("reuse")
    # The random sampler at seed 0 draws the second choice first (the order is asserted below).
    proc = run_search([str(TINY), "--name", "reuse", "--storage", str(storage), "--set", "search.num_samples=2",
                       "--set", "search.max_concurrent=1", "--set", "search.sampler=random",
                       "--set", "search.include_spec_config=false",
                       "--set", f"search.space={{model.name: {{choice: [{SMALL}, {LARGE}]}}}}",
                       "--set", "training.epochs=1", "--set", "training.eval_every=1",
                       "--set", "search.asha.grace_period=1", "--set", "data.synthetic_size=24",
                       "--set", "data.val_size=8"], cwd=storage, env_extra=NO_HOST_OOM_KILLS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted(result_rows(storage / "reuse").values(), key=lambda rows: rows[0]["timestamp"])
    assert [rows[0]["config"]["model.name"] for rows in trials] == [LARGE, SMALL], "the large trial did not run first"
    return trials


def test_the_next_trial_in_a_reused_process_reports_its_own_peak_not_the_process_lifetimes(large_then_small):
    large, small = large_then_small
    assert large[0]["pid"] == small[0]["pid"], "the second trial did not run in the first one's process"
    large_peak, small_peak = max(r["peak_memory_gb"] for r in large), max(r["peak_memory_gb"] for r in small)
    # The small trial alone peaks at a few hundred MB above the interpreter; it reported the large one's peak
    # when the process's lifetime high-water mark was read, and that plus what was kept when nothing was freed.
    assert small_peak < 0.5 * large_peak, (small_peak, large_peak)
