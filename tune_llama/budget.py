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

The bracket gets a third of the budget (``EXPLORE_SHARE``), at least what ``MIN_TRIALS`` trials cost, and
takes as many trials as fit. Small budgets buy little exploration on purpose: on ``tiny.yaml``, whose recipe
is right but under-trained, every epoch the bracket takes from the winner at 4 runs costs 2.5-5% of its
final loss (docs/results.md). A budget below what the smallest bracket costs (1.44 runs on ``tiny.yaml``)
is too small to search: the spec's config alone trains for all of it, and the plan says so.

The spec's own config is the first trial (``search.include_spec_config``), so a search does not hand back
something worse than the recipe unless the recipe lost at a rung. The others are a Latin hypercube over the
space (``design``), not the sampler's proposals: every rung of the bracket waits for all its trials, so no
trial has a result before the last config is proposed, and a model-based sampler would propose at random;
a few random draws leave whole regions out (five draws from ``tiny.yaml``'s space miss every AdamW learning
rate in 1e-3..1e-2 one time in three), where a stratified design spreads them over each range and choice,
and of many such designs the one farthest from the spec's own config and within itself is taken (maximin).

Every trial trains on a learning-rate schedule as long as the winner's run (``winner_epochs``), so what a
trial sees before a rung is the start of the run the winner makes (docs/search.md, "Budget").
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from tune_llama.spec import Spec

MIN_TRIALS = 5
"""The smallest bracket: the spec's config and four others. A budget that cannot pay for it is too small."""
EXPLORE_SHARE = 1 / 3
"""Share of a budget the bracket may spend, when that buys more than ``MIN_TRIALS`` trials."""
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
            return [f"budget {self.budget:g} runs is too small to search (a bracket of {MIN_TRIALS} trials needs "
                    "more): "
                    f"training the spec's own config for {self.winner_epochs:g} epochs ({runs(self.winner_epochs)}), "
                    "keeping its best checkpoint"]
        cuts = ", ".join(f"{k} past epoch {r:g}" for r, k in zip(self.rungs, self.keep))
        return [f"budget {self.budget:g} runs = {self.budget_epochs:g} trial-epochs: {self.trials} trials, {cuts}; "
                f"{self.full_length} to the full {self.run_epochs:g} epochs",
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


def halving_rungs(spec: Spec) -> list[tuple[float, int]]:
    """(epoch, reduction factor) of each rung of a ``halving`` search without a budget. With the ``asha``
    settings left unset, the rungs measured above: the screen at 1/16 of the run keeping half, the
    decision at 1/4 keeping a quarter. Otherwise ``grace_period`` x ``reduction_factor``^k below the run."""
    run, asha = float(spec.training.epochs), spec.search.asha
    interval = report_interval(spec)
    if asha.grace_period is None and asha.reduction_factor is None:
        # The screen keeps half, not a third: judged as trials arrive, a config is compared with the few recorded
        # so far, among which the order of good configs at 1/16 of the run is noise (rho -0.20..0.56 over the best
        # quarter, nine seeds); a half still stops the clearly poor ones (rho 0.88..0.99 over all).
        measured = {on_report(run * SCREEN, interval): 2, on_report(run * DECISION, interval): 4}
        return [(rung, factor) for rung, factor in measured.items() if rung < run - 1e-9]
    factor = asha.reduction_factor or 2
    out, rung = [], asha.grace_period if asha.grace_period is not None else interval
    while rung < run - 1e-9:
        out.append((rung, factor))
        rung *= factor
    return out


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
    interval = report_interval(spec)
    screen, decision = on_report(run * SCREEN, interval), on_report(run * DECISION, interval)
    rungs = tuple(r for r in dict.fromkeys((screen, decision)) if r < run - 1e-9)
    most = spec.search.num_samples or 10_000
    smallest = min(MIN_TRIALS, most)
    cheapest = bracket_epochs(smallest, rungs, keeps(smallest, rungs), run)
    if most == 1 or budget * run < cheapest - 1e-9:
        return Plan(budget, run, 1, (), (), budget * run)
    allowance = max(cheapest, EXPLORE_SHARE * budget * run)
    trials = smallest
    while trials < most and bracket_epochs(trials + 1, rungs, keeps(trials + 1, rungs), run) <= allowance + 1e-9:
        trials += 1
    keep = keeps(trials, rungs)
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


def trials_spec(spec: Spec, plan: Optional[Plan]) -> Spec:
    """The spec every trial trains from: with a plan, as long as the winner's run, so that a trial judged at
    a rung has seen the start of that run's learning-rate schedule (the winner continues it unchanged)."""
    if plan is None:
        return spec
    epochs = math.ceil(plan.winner_epochs - 1e-9)
    return dataclasses.replace(spec, training=dataclasses.replace(spec.training, epochs=epochs))


def patience(spec: Spec) -> int:
    """Reports in a row without a better value after which the winner stops: two epochs' worth (one epoch
    stopped ``tiny.yaml``'s recipe at epoch 11 of a run still improving at 15), at least three."""
    every = spec.training.eval_every
    return max(3, 2 * round(1 / every)) if every <= 1 else 3


def design(space: dict[str, dict[str, list]], n: int, seed: int,
           given: list[dict[str, Any]] = (), candidates: int = 200) -> list[dict[str, Any]]:
    """``n`` configs of ``space`` as a centred Latin hypercube: each range cut into ``n`` equal strata (in log
    scale for ``loguniform``), one config at the middle of each, each choice used ``n / k`` times. Of
    ``candidates`` random pairings of the strata (``seed``), the one whose configs lie farthest from each other
    and from the ``given`` ones (the spec's own, already tried): a maximin design, so that few configs still
    cover the space. Centred, because maximin over random points within strata pushes them to the edges of
    the ranges (a learning rate at the top of its range, where training is least stable)."""
    rng = random.Random(seed)
    fixed = [unit_point(space, p) for p in given]
    best, best_score = [], -1.0
    for _ in range(max(1, candidates)):
        points = latin_hypercube(space, n, rng)
        units = [unit_point(space, p) for p in points]
        score = min((gower(a, b) for i, a in enumerate(units) for b in units[i + 1:] + fixed), default=0.0)
        if score > best_score:
            best, best_score = points, score
    return best


def latin_hypercube(space: dict[str, dict[str, list]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    columns = {}
    for key, dist in space.items():
        (kind, args), = dist.items()
        if kind == "choice":
            column = [args[i % len(args)] for i in range(n)]
        else:
            column = [scaled(kind, args, (i + 0.5) / n) for i in range(n)]  # centred: no config at an edge
        rng.shuffle(column)
        columns[key] = column
    return [{key: column[i] for key, column in columns.items()} for i in range(n)]


def unit_point(space: dict[str, dict[str, list]], params: dict[str, Any]) -> dict[str, Any]:
    """Each value where it lies in its range, 0 to 1 (log scale for ``loguniform``); a choice as itself."""
    out = {}
    for key, dist in space.items():
        (kind, args), = dist.items()
        value = params.get(key)
        if kind == "choice" or not isinstance(value, (int, float)):
            out[key] = ("choice", value)  # compared for equality only
        elif kind == "loguniform":
            out[key] = math.log(value / args[0]) / math.log(args[1] / args[0])
        else:
            out[key] = (value - args[0]) / max(args[1] - args[0], 1e-12)
    return out


def gower(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Mean over fields of |difference| (ranges) or 0/1 (choices): how far apart two configs are."""
    parts = [float(x != b[k]) if isinstance(x, tuple) or isinstance(b[k], tuple) else abs(x - b[k])
             for k, x in a.items()]
    return sum(parts) / max(len(parts), 1)


def scaled(kind: str, args: list, u: float) -> Any:
    """The value at ``u`` in [0, 1) of a spec distribution's range."""
    low, high = args[0], args[1]
    if kind == "loguniform":
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    if kind == "int":
        return min(int(high), int(low) + math.floor(u * (int(high) - int(low) + 1)))
    if kind == "quniform":
        return min(high, low + round(u * (high - low) / args[2]) * args[2])
    return low + u * (high - low)
