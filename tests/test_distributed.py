"""Trials larger than one process, on CPU: two gloo workers (torch.distributed, then real Ray Train inside a
real Tune search) against one process."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import TINY, result_rows, run_search
from tune_llama.spec import Spec, spec_from_dict

WORLD = 2
TOLERANCE = 1e-5


def tiny_spec(parallel: str = "ddp", **training) -> Spec:
    """33 training rows: with 8 rows per global micro-batch the last has 1, so one worker's share is empty;
    accumulation 2 gives 3 optimizer steps of 2, 2 and 1 micro-batches; reports after steps 2 and 3."""
    return spec_from_dict({
        "model": {"name": "random:tiny"},
        "data": {"source": "synthetic", "synthetic_size": 41, "val_size": 8, "batch_size": 8 // WORLD},
        "training": {"epochs": 1, "optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "device": "cpu",
                     "gradient_accumulation_steps": 2, "eval_every": 2, "parallel": parallel, "log_every": 1,
                     **training},
        "search": {"resources": {"workers": WORLD}},
    })


# ---------------------------------------------------------------- two gloo workers, no Ray

class StopHere(Exception):
    pass


def worker(rank: int, store: str, out: str, spec_dict: dict) -> None:
    """One of two workers: the whole run; then the run again, stopped at its first report (checkpointed),
    restored into a fresh run and finished. Rank 0 writes the weights and metrics of both."""
    import torch.distributed as dist
    from tune_llama.distributed import (fit_workers, load_worker_state, save_worker_state, setup_workers,
                                        trainable_weights)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    spec = spec_from_dict(spec_dict)
    results = {}
    run, team = setup_workers(spec)
    fit_workers(run, team)
    results["whole"] = (trainable_weights(run, team), run.history)

    checkpoint = Path(out) / "checkpoint"

    def stop_at_first_report(metrics, directory):
        raise StopHere

    run, team = setup_workers(spec)
    try:
        fit_workers(run, team, save_checkpoint=lambda r: save_worker_state(r, team, checkpoint),
                    report=stop_at_first_report)
    except StopHere:
        pass
    stopped_at = run.step
    run, team = setup_workers(spec)
    load_worker_state(run, team, checkpoint)
    fit_workers(run, team)
    results["resumed"] = (trainable_weights(run, team), run.history, stopped_at)
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


def two_workers(spec: Spec, tmp: Path) -> dict:
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(str(tmp / "store"), str(tmp), spec.to_dict()), nprocs=WORLD, join=True)
    return torch.load(tmp / "results.pt", weights_only=False)


def one_process(spec: Spec, batch_size: int) -> tuple[dict, list]:
    import dataclasses
    from tune_llama.loop import fit, setup
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, batch_size=batch_size))
    run = fit(setup(spec))
    return {k: v.detach().clone() for k, v in run.model.named_parameters() if v.requires_grad}, run.history


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single_batch8():
    return one_process(tiny_spec(), batch_size=8)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_workers_of_batch_4_make_the_update_of_one_process_of_batch_8_and_resume_exactly(
        parallel, single_batch8, tmp_path):
    torch.set_num_threads(1)
    spec = tiny_spec(parallel)
    out = two_workers(spec, tmp_path)
    weights, history = out["whole"]
    reference, reference_history = single_batch8
    assert max_difference(weights, reference) < TOLERANCE
    # Sensitive: one process of batch 4 (half the data per step) lands somewhere else entirely.
    assert max_difference(one_process(spec, batch_size=4)[0], reference) > 100 * TOLERANCE
    assert [r["step"] for r in history] == [r["step"] for r in reference_history] == [2, 3]
    row, reference_row = history[-1], reference_history[-1]
    for key in ("examples_seen", "tokens_seen"):
        assert row[key] == reference_row[key], key
    for key in ("train_loss", "eval_loss"):
        assert row[key] == pytest.approx(reference_row[key], rel=1e-5), key

    resumed, resumed_history, stopped_at = out["resumed"]
    assert stopped_at == 2
    assert max_difference(resumed, weights) < 1e-6
    assert resumed_history[-1]["tokens_seen"] == row["tokens_seen"]


def test_a_checkpoint_of_two_workers_is_refused_in_one_line_by_another_number_of_workers(tmp_path):
    from tune_llama.distributed import WORKERS_FILE, Team, load_worker_state
    from tune_llama.errors import CheckpointError
    (tmp_path / WORKERS_FILE).write_text(json.dumps({"workers": 2, "parallel": "ddp"}))
    with pytest.raises(CheckpointError) as err:
        load_worker_state(None, Team(0, 3, torch.device("cpu"), "ddp"), tmp_path)
    assert "\n" not in str(err.value) and "search.resources.workers=2" in str(err.value)


def test_concurrent_trials_fit_the_cluster_unless_the_spec_asks_for_fewer():
    from tune_llama.distributed import concurrent_trials
    from tune_llama.errors import UserError
    spec = spec_from_dict({"search": {"max_concurrent": 8, "resources": {"workers": 2, "gpu": 1, "cpu": 4}}})
    assert concurrent_trials(spec, {"GPU": 8, "CPU": 64}) == 4
    assert concurrent_trials(spec, {"GPU": 5, "CPU": 64}) == 2
    spec.search.max_concurrent = 1
    assert concurrent_trials(spec, {"GPU": 8, "CPU": 64}) == 1
    with pytest.raises(UserError, match="workers"):
        concurrent_trials(spec, {"GPU": 1, "CPU": 64})
