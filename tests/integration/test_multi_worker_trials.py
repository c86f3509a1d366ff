"""Trials larger than one process, on CPU: two gloo workers (torch.distributed, then real Ray Train inside a
real Tune search) against one process; stopped or paused multi-worker trials give their workers back."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import TINY, popen_search, result_rows, summary_counts
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


def worker(rank: int, store: str, out: str, spec_dicts: dict[str, dict]) -> None:
    """One of two workers, for each spec (each ``training.parallel``): the whole run; then the run again,
    stopped at its first report (checkpointed), restored into a fresh run and finished. Rank 0 writes the
    weights and metrics of both."""
    import torch.distributed as dist
    from tune_llama.distributed import (fit_workers, load_worker_state, save_worker_state, setup_workers,
                                        trainable_weights)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)

    def stop_at_first_report(metrics, directory):
        raise StopHere

    results = {}
    for parallel, spec_dict in spec_dicts.items():
        spec = spec_from_dict(spec_dict)
        run, team = setup_workers(spec)
        fit_workers(run, team)
        whole = (trainable_weights(run, team), run.history)

        checkpoint = Path(out) / parallel
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
        results[parallel] = {"whole": whole, "resumed": (trainable_weights(run, team), run.history, stopped_at)}
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


def two_workers(specs: dict[str, Spec], tmp: Path) -> dict:
    import torch.multiprocessing as mp
    spec_dicts = {name: spec.to_dict() for name, spec in specs.items()}
    mp.spawn(worker, args=(str(tmp / "store"), str(tmp), spec_dicts), nprocs=WORLD, join=True)
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


def test_two_workers_of_batch_4_make_the_update_of_one_process_of_batch_8_and_resume_exactly_ddp_and_fsdp(
        tmp_path):
    """The last global micro-batch has one row, so one worker's share of it is empty (a zero-weighted pass)."""
    torch.set_num_threads(1)
    modes = ("ddp", "fsdp")
    runs = two_workers({mode: tiny_spec(mode) for mode in modes}, tmp_path)
    reference, reference_history = one_process(tiny_spec(), batch_size=8)
    # Sensitive: one process of batch 4 (half the data per step) lands somewhere else entirely.
    assert max_difference(one_process(tiny_spec(), batch_size=4)[0], reference) > 100 * TOLERANCE
    for mode in modes:
        weights, history = runs[mode]["whole"]
        assert max_difference(weights, reference) < TOLERANCE, mode
        assert [r["step"] for r in history] == [r["step"] for r in reference_history] == [2, 3]
        row, reference_row = history[-1], reference_history[-1]
        for key in ("examples_seen", "tokens_seen"):
            assert row[key] == reference_row[key], (mode, key)
        for key in ("train_loss", "eval_loss"):
            assert row[key] == pytest.approx(reference_row[key], rel=1e-5), (mode, key)

        resumed, resumed_history, stopped_at = runs[mode]["resumed"]
        assert stopped_at == 2
        assert max_difference(resumed, weights) < 1e-6, mode
        assert resumed_history[-1]["tokens_seen"] == row["tokens_seen"]

    # Export reads the FSDP checkpoint's shards as one ordinary safetensors file, every weight at full shape.
    from safetensors.torch import load_file
    from tune_llama.checkpoint import weights_file
    assert (tmp_path / "fsdp" / "sharded").is_dir() and not (tmp_path / "fsdp" / "trainable.safetensors").exists()
    with weights_file(tmp_path / "fsdp") as weights:
        consolidated = load_file(weights)
    assert {k: v.shape for k, v in consolidated.items()} == {k: v.shape for k, v in reference.items()}
    assert max_difference(consolidated, reference) > 0, "the step-2 checkpoint, not the final weights"


# ---------------------------------------------------------------- a real search: Tune trials of 2 Ray Train workers

# Two trials of 2 workers x 1 CPU: on this 2-CPU machine one at a time (max_concurrent=2 is capped by the cluster).
# Two reports per epoch (each a checkpoint of both workers: what a report costs here), no ASHA stop before
# max_t, and enough rows that a trial trains for some seconds after its first report: time to kill one of its
# workers.
WORKER_SEARCH = ["--set", "search.resources.workers=2", "--set", "search.resources.cpu=1",
                 "--set", "search.num_samples=2", "--set", "search.max_concurrent=2", "--set", "search.max_failures=1",
                 "--set", "training.epochs=2", "--set", "training.eval_every=0.5",
                 "--set", "search.asha.grace_period=2", "--set", "data.synthetic_size=400"]
REPORTS = 4


@pytest.fixture(scope="module")
def worker_search(tmp_path_factory):
    """The search above, with one Ray Train worker of the first trial SIGKILLed after that trial's first report.
    Returns (experiment folder, killed trial folder name, the trial driver's pid when it was killed)."""
    from conftest import first_report, kill_session, session_processes, wait_until

    storage = tmp_path_factory.mktemp("workers")
    experiment = storage / "workers"
    # Tune flushes result.json at its state saves (every 10 s at first): every second, so the first report is
    # seen before a fast trial has passed it.
    leader = popen_search([str(TINY), "--name", "workers", "--storage", str(storage), *WORKER_SEARCH], cwd=storage,
                          env_extra={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        # Generous: Ray Train starts two workers per trial, slow on a busy 2-core machine.
        trial, driver_pid = wait_until(first_report(experiment, 1.0), leader, "a trial's first report", timeout=900)

        # Only this search's: its session, a Ray Train worker's process title.
        victim = wait_until(lambda: session_processes(leader.pid, "ray::RayTrainWorker"), leader,
                            "the trial's Ray Train workers", timeout=600)[-1]
        os.kill(victim, signal.SIGKILL)
        code = leader.wait(timeout=1200)
    finally:
        if leader.poll() is None:
            kill_session(leader)
    log = (storage / "search.log").read_text()
    assert code == 0, log[-3000:]
    return experiment, trial, driver_pid


def test_a_search_of_two_worker_trials_finishes_with_one_report_per_point_and_checkpoints_in_each_trial(
        worker_search):
    experiment, _, _ = worker_search
    assert "2 ended normally, 0 errored" in summary_counts(experiment)
    rows = result_rows(experiment)
    assert len(rows) == 2
    for trial, trial_rows in rows.items():
        assert [r["report"] for r in trial_rows] == list(range(1, REPORTS + 1)), trial
        assert trial_rows[-1]["epoch"] == 2 and trial_rows[-1]["examples_seen"] == 2 * 384
        assert all(r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 for r in trial_rows)
        checkpoints = sorted((experiment / trial).glob("checkpoint_2*"))
        assert json.loads((checkpoints[-1] / "metrics.json").read_text())["report"] == REPORTS
        for checkpoint in checkpoints:
            assert json.loads((checkpoint / "workers.json").read_text()) == {"workers": 2, "parallel": "ddp"}
            assert {"trainable.safetensors", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in checkpoint.iterdir()}


def test_a_killed_worker_makes_tune_retry_its_trial_from_the_last_checkpoint(worker_search):
    experiment, trial, driver_pid = worker_search
    killed = result_rows(experiment)[trial]
    before = [r for r in killed if r["pid"] == driver_pid]
    after = [r for r in killed if r["pid"] != driver_pid]
    assert before and after, f"the trial was never retried: pids {[r['pid'] for r in killed]}"
    assert killed[:len(before)] == before
    assert [r["report"] for r in killed] == list(range(1, REPORTS + 1))
    assert after[0]["report"] == before[-1]["report"] + 1
    assert after[0]["tokens_seen"] > before[-1]["tokens_seen"]


def test_the_best_two_worker_checkpoint_exports_as_an_ordinary_model(worker_search, tmp_path):
    import subprocess
    import sys
    experiment, _, _ = worker_search
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "tune_llama.export", str(experiment), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0


def test_a_trial_whose_workers_the_cluster_cannot_hold_is_one_line_and_leaves_no_folder(tmp_path):
    from conftest import run_search
    proc = run_search([str(TINY), "--name", "big", "--storage", str(tmp_path), "--set", "search.resources.workers=64"],
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: search.resources: a trial's 64 workers") and \
        "\n" not in proc.stderr.strip(), proc.stderr[-2000:]
    assert not (tmp_path / "big").exists()


# ---------------------------------------------------------------- ASHA stops give the workers back

@pytest.mark.timeout(1500)
@pytest.mark.parametrize("scheduler", ["asha", "halving"])
def test_stopped_or_waiting_two_worker_trials_give_back_their_workers_so_every_trial_runs(tmp_path, scheduler):
    """Four trials of 2 workers x 1 CPU on a cluster that holds one such trial at a time, the scheduler keeping
    only the best quarter at the first rung: stopped trials (ASHA), and trials paused at the rung until it
    holds four results (halving), must free their placement group, or the next trial waits for it forever
    and this test times out.

    The random sampler (seed 0) draws SGD at lr 0.0023, 0.0040, 0.0091, then AdamW: on the tiny model a larger
    SGD lr lowers the loss faster, so with mode=max the first trial leads at the first rung and ASHA stops
    the SGD trials after it; halving lets one trial of the four go on."""
    import subprocess

    from conftest import NO_HOST_OOM_KILLS, kill_session, popen_search, summary_counts
    from tune_llama.results import RUNG_STOPPED, load_search

    storage = tmp_path
    leader = popen_search([str(TINY), "--name", "asha", "--storage", str(storage),
                           "--set", "search.resources.workers=2", "--set", "search.resources.cpu=1",
                           # One trial at a time, in the sampler's order: ASHA's stops then do not hang on which
                           # trial's workers the cluster took first (their order decides who is cut at the rung).
                           "--set", "search.num_samples=4", "--set", "search.max_concurrent=1",
                           # A whole epoch (four reports) after the rung: ASHA's stop at epoch 1 lands before a
                           # fast trial could finish anyway (then it would count as finished, not stopped). Each
                           # report is a checkpoint of both workers, the most of a trial's time here: no more.
                           "--set", "training.epochs=2", "--set", "search.asha.grace_period=1",
                           "--set", "data.synthetic_size=400", "--set", "training.eval_every=0.25",
                           "--set", "search.asha.reduction_factor=4", "--set", "search.sampler=random",
                           "--set", "search.mode=max", "--set", f"search.scheduler={scheduler}"],
                          cwd=storage, env_extra=NO_HOST_OOM_KILLS)
    try:
        code = leader.wait(timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail("the search never finished: a stopped trial's workers were not given back")
    finally:
        if leader.poll() is None:
            kill_session(leader)
    log = (storage / "search.log").read_text()
    assert code == 0, log[-3000:]
    assert "4 ended normally, 0 errored" in summary_counts(storage / "asha")
    search = load_search(storage / "asha")
    statuses = [search.status(t) for t in search.trials]
    assert len(statuses) == 4 and all(t.rows for t in search.trials), statuses
    assert statuses.count(RUNG_STOPPED) >= 1, f"ASHA stopped no trial, nothing was tested: {statuses}"
