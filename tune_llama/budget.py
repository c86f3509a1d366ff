"""``search.budget: K``: a search sized to K runs of training compute, whose winner is trained to full length
and then on with what the exploration left.

One run is the spec's own training run, ``training.epochs`` over the train split. The plan is one
successive-halving bracket, cut at two rungs measured to rank configs as they rank at full length:

- a screen at 1/16 of the run keeps the best third (it only removes what is clearly poor: on ``tiny.yaml``
  the loss there orders 48 configs as their full-length loss does with Spearman rho 0.98-0.99, but it orders
  the best quarter among themselves poorly, rho 0.3);
- a decision at 1/4 of the run keeps one (rho 0.68 within the best quarter, and the full-length best was first
  there on every seed measured), which trains to ``training.epochs``;
- the winner then goes on from its checkpoint with the rest of the budget while its validation loss
  improves (``scheduler.HalvingScheduler``), so most of K trains the model that is handed back.

The bracket gets ``EXPLORE_SHARE`` of the budget, at least ``MIN_SEARCH`` runs: as many trials as fit.
The spec's own config is the first of them (``search.include_spec_config``), so a search does not hand back
something worse than the recipe unless the recipe lost at a rung. Below ``MIN_SEARCH`` runs no bracket fits
(six trials need 1.5 runs); the spec's config alone trains for the whole budget, and the plan says so.
Every trial trains on a learning-rate schedule as long as the winner's run (``winner_epochs``), so what a
trial sees before a rung is the start of the run the winner makes (docs/search.md, "Budget").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from tune_llama.spec import Spec

MIN_SEARCH = 1.5
"""Runs below which a budget cannot pay for a bracket of the six trials that make a search."""
EXPLORE_SHARE = 0.375
"""Share of a budget above ``MIN_SEARCH / EXPLORE_SHARE`` (4 runs) that the bracket may spend."""
SCREEN, DECISION = 1 / 16, 1 / 4
"""The two rungs, as shares of ``training.epochs``."""
SCREEN_KEEP = 1 / 3
PLAN_FILE = "budget_plan.json"


@dataclass(frozen=True)
class Plan:
    budget: float
    """K: the search's compute in runs."""
    run_epochs: float
    """One run: ``training.epochs``."""
    trials: int
    """Configs tried, the spec's own first."""
    rungs: tuple[float, ...]
    """Epochs at which trials are judged, below ``run_epochs``."""
    keep: tuple[int, ...]
    """How many trials go on past each rung."""
    winner_epochs: float
    """The planned length of the winner's run: ``run_epochs`` plus what the bracket leaves of the budget."""

    @property
    def budget_epochs(self) -> float:
        return self.budget * self.run_epochs

    @property
    def explore_epochs(self) -> float:
        """Trial-epochs of the bracket: every trial to its last rung, the survivors to ``run_epochs``."""
        return bracket_epochs(self.trials, self.rungs, self.keep, self.run_epochs)

    @property
    def full_length(self) -> int:
        return self.keep[-1] if self.keep else self.trials

    def lines(self) -> list[str]:
        runs = lambda epochs: f"{epochs / self.run_epochs:.2f} runs"  # noqa: E731
        if self.trials == 1:
            return [f"budget {self.budget:g} runs is too small to search (a search needs {MIN_SEARCH:g}): "
                    f"training the spec's own config for {self.winner_epochs:g} epochs ({runs(self.winner_epochs)}), "
                    "keeping its best checkpoint"]
        cuts = ", ".join(f"{k} past epoch {r:g}" for r, k in zip(self.rungs, self.keep))
        return [f"budget {self.budget:g} runs = {self.budget_epochs:g} trial-epochs: {self.trials} trials (the spec's "
                f"config first), {cuts}; {self.full_length} to the full {self.run_epochs:g} epochs",
                f"  the bracket spends about {self.explore_epochs:.4g} trial-epochs ({runs(self.explore_epochs)}); "
                f"the winner goes on to epoch {self.winner_epochs:.4g} while its validation loss improves"]

    def write(self, folder: Path) -> None:
        (folder / PLAN_FILE).write_text(json.dumps(asdict(self), indent=1))


def bracket_epochs(trials: int, rungs: tuple[float, ...], keep: tuple[int, ...], run_epochs: float) -> float:
    alive, spent, previous = trials, 0.0, 0.0
    for rung, kept in zip(rungs, keep):
        spent += alive * (rung - previous)
        alive, previous = kept, rung
    return spent + alive * (run_epochs - previous)


def report_interval(spec: Spec) -> float:
    """The shortest time between two reports in epochs: rungs fall on reports (a step count: one epoch)."""
    every = spec.training.eval_every
    return every if every <= 1 else 1.0


def on_report(epochs: float, interval: float) -> float:
    """``epochs`` moved up to the next report time (a multiple of ``interval``)."""
    return math.ceil(epochs / interval - 1e-9) * interval


def plan(spec: Spec) -> Optional[Plan]:
    """The spec's budget plan, or None without ``search.budget``."""
    budget = spec.search.budget
    if budget is None:
        return None
    run = float(spec.training.epochs)
    if budget < MIN_SEARCH or spec.search.num_samples == 1:
        return Plan(budget, run, 1, (), (), budget * run)
    interval = report_interval(spec)
    screen, decision = on_report(run * SCREEN, interval), on_report(run * DECISION, interval)
    rungs = tuple(r for r in dict.fromkeys((screen, decision)) if r < run - 1e-9)
    allowance = max(MIN_SEARCH, EXPLORE_SHARE * budget) * run
    best = None
    most = spec.search.num_samples or 10_000
    for trials in range(2, max(2, most) + 1):
        keep = keeps(trials, rungs)
        if bracket_epochs(trials, rungs, keep, run) > allowance + 1e-9:
            break
        best = (trials, keep)
    if best is None:  # rungs so late (coarse reports) that two trials do not fit: the smallest bracket anyway
        best = (2, keeps(2, rungs))
    trials, keep = best
    spent = bracket_epochs(trials, rungs, keep, run)
    return Plan(budget, run, trials, rungs, keep, run + max(0.0, budget * run - spent))


def keeps(trials: int, rungs: tuple[float, ...]) -> tuple[int, ...]:
    """The screen keeps a third (at least two), the decision one; a single rung keeps one."""
    if len(rungs) == 2:
        return max(2, min(trials - 1, math.ceil(trials * SCREEN_KEEP))), 1
    return (1,) if rungs else ()


def read_plan(folder: Path) -> Optional[Plan]:
    try:
        raw = json.loads((folder / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return Plan(**{**raw, "rungs": tuple(raw["rungs"]), "keep": tuple(raw["keep"])})
