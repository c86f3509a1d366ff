"""A search sized by ``search.budget`` on real Ray and Optuna: it stays within its budget, tries the spec's own
config first, trains its winner past ``training.epochs`` on the schedule every trial started, and exports it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import get_scheduler

from conftest import TINY, result_rows, run_search
from tune_llama.budget import read_plan
from tune_llama.export import EXPORT_FILE, export
from tune_llama.results import load_search

BUDGET = ["--set", "training.eval_every=0.25", "--set", "search.max_concurrent=2", "--set", "wandb.mode=disabled",
          "--set", "training.lr_schedule=cosine", "--set", "training.warmup_ratio=0.1"]


@pytest.fixture(scope="module")
def budget_search(tmp_path_factory) -> tuple[Path, str]:
    storage = tmp_path_factory.mktemp("budget")
    proc = run_search([str(TINY), "--name", "b", "--storage", str(storage), "--set", "search.budget=2", *BUDGET],
                      cwd=storage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "b", proc.stdout + proc.stderr


def test_the_plan_is_printed_before_the_search_starts(budget_search):
    _, output = budget_search
    assert "budget 2 runs = 8 trial-epochs: 5 trials, 2 past epoch 0.25, 1 past epoch 1" in output


def test_the_trials_reports_together_stay_within_the_budget(budget_search):
    folder, _ = budget_search
    spent = sum(rows[-1]["epoch"] for rows in result_rows(folder).values())
    assert spent <= 2 * 4 + 1e-9
    assert len(result_rows(folder)) == read_plan(folder).trials == 5


def test_the_specs_own_config_is_the_first_trial(budget_search):
    folder, _ = budget_search
    first = load_search(folder).trials[0]
    assert first.params == {"training.lr": 3e-3, "training.gradient_accumulation_steps": 1,
                            "training.optimizer": "adamw"}


def test_one_trial_trains_past_training_epochs_and_is_the_winner_that_export_takes(budget_search, tmp_path):
    folder, _ = budget_search
    search = load_search(folder)
    past = [t for t in search.trials if t.epochs > search.spec.training.epochs]
    assert len(past) == 1
    assert search.best()[0] is past[0]
    info = json.loads((export(folder, tmp_path / "export") / EXPORT_FILE).read_text())
    assert info["trial_id"] == past[0].trial_id and info["epoch"] > search.spec.training.epochs


def test_a_trial_cut_at_a_rung_saw_the_start_of_the_winners_learning_rate_schedule(budget_search):
    """Every trial trains on the schedule of the winner's whole run (cosine over its planned epochs), so a rung
    judges the start of the run that is deployed, and the winner goes on without a jump in its learning rate."""
    import torch
    folder, _ = budget_search
    epochs = math.ceil(read_plan(folder).winner_epochs)
    for name, rows in result_rows(folder).items():
        steps_per_epoch = round(rows[-1]["step"] / rows[-1]["epoch"])
        total = steps_per_epoch * epochs
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        reference = get_scheduler("cosine", optimizer, num_warmup_steps=int(0.1 * total), num_training_steps=total)
        lr_at = {}  # the schedule's multiplier after each step
        for step in range(1, total + 1):
            optimizer.step()
            reference.step()
            lr_at[step] = reference.get_last_lr()[0]
        peak = next(r["lr"] / lr_at[r["step"]] for r in rows if lr_at[r["step"]] > 0)
        for row in rows:
            assert row["lr"] == pytest.approx(peak * lr_at[row["step"]], rel=1e-6), (name, row["step"])


def test_the_summary_compares_the_winner_with_the_specs_own_config_and_counts_the_budget(budget_search):
    folder, _ = budget_search
    summary = (folder / "summary.txt").read_text()
    assert "your own config's" in summary or "against your config's" in summary
    assert "of a budget of 2" in summary


def test_more_trials_cannot_be_added_to_a_budget_search(budget_search):
    folder, _ = budget_search
    proc = run_search(["--resume", str(folder), "--more", "2"], cwd=folder.parent)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --more: ") and "search.budget=2" in proc.stderr


def test_a_budget_too_small_to_search_trains_the_specs_config_for_the_whole_budget(tmp_path):
    proc = run_search([str(TINY), "--name", "one", "--storage", str(tmp_path), "--set", "search.budget=1.25",
                       *BUDGET], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "too small to search" in proc.stdout + proc.stderr
    (rows,) = result_rows(tmp_path / "one").values()
    assert 4 < rows[-1]["epoch"] <= 5 + 1e-9
