"""A compact, readable progress table for a search, in place of Ray's own (``--verbose`` brings that back).

Every few seconds on a terminal (every 30 s in a log file) it prints one line
per trial: its params, how far it got, its latest and best validation loss,
and its status; it fits 100 columns.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from tune_llama.spec import Spec

WIDTH = 100


def progress_callbacks(spec: Spec, verbose: bool) -> list:
    return [] if verbose else [ProgressTable(spec)]


def format_params(params: dict[str, Any], keys: list[str]) -> str:
    cells = []
    for key in keys:
        value = params.get(key)
        cells.append(f"{key.split('.')[-1]}={value:.3g}" if isinstance(value, float) else
                     f"{key.split('.')[-1]}={value}")
    return " ".join(cells)


def format_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def table(spec: Spec, trials: list[dict[str, Any]]) -> str:
    """The lines to print for ``trials`` (dicts with id, params, epoch, latest, best, status)."""
    keys = list(spec.search.space)
    lines = [f"{'trial':<10} {'params':<46} {'epoch':>6} {'latest':>8} {'best':>8}  status"]
    for t in trials:
        params = format_params(t["params"], keys)
        params = params if len(params) <= 46 else params[:45] + "…"
        lines.append(f"{t['id'][:10]:<10} {params:<46} {t['epoch']:>6.2f} {format_loss(t['latest']):>8} "
                     f"{format_loss(t['best']):>8}  {t['status']}"[:WIDTH])
    return "\n".join(lines)


def _callback_base():
    from ray.tune import Callback
    return Callback


class ProgressTable(_callback_base()):
    def __init__(self, spec: Spec):
        self.spec = spec
        self.metric, self.mode = spec.search.metric, spec.search.mode
        self.trials: dict[str, dict[str, Any]] = {}
        self.every = 5.0 if sys.stdout.isatty() else 30.0
        self.last_print = 0.0

    def _entry(self, trial) -> dict[str, Any]:
        return self.trials.setdefault(trial.trial_id, {"id": trial.trial_id, "params": dict(trial.config),
                                                       "epoch": 0.0, "latest": None, "best": None,
                                                       "status": "pending"})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._entry(trial)["status"] = "running"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        entry = self._entry(trial)
        value = result.get(self.metric)
        entry.update(epoch=float(result.get("epoch", 0.0)), latest=value, status="running")
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = entry["best"] is None or (value < entry["best"] if self.mode == "min" else value > entry["best"])
            entry["best"] = value if better else entry["best"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        entry = self._entry(trial)
        entry["status"] = "done" if entry["epoch"] >= self.spec.training.epochs - 1e-9 else "stopped early"

    def on_trial_error(self, iteration, trials, trial, **info):
        self._entry(trial)["status"] = "errored"

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_print >= self.every:
            self.print()

    def on_experiment_end(self, trials, **info):
        self.print()

    def print(self) -> None:
        self.last_print = time.monotonic()
        if self.trials:
            print(f"\n[{time.strftime('%H:%M:%S')}] {len(self.trials)} trials\n"
                  + table(self.spec, list(self.trials.values())), flush=True)
