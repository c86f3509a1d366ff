"""Weights & Biases logging of a search: one W&B run per trial, grouped by the search name.

A Tune ``LoggerCallback`` (public) that opens one W&B run per trial with W&B's
public multi-run API (``wandb.init(reinit="create_new")``), so no Ray or W&B
internals are involved:

* the run's config is the trial's whole spec with its sampled params applied, flat
  (``model.name``, ``data.source``, ``training.lr``), so runs can be filtered and
  compared across searches; every report is logged as metrics (step = Tune's
  ``training_iteration``), without Tune's bookkeeping keys; the summary holds
  ``best_eval_loss`` (and ``best_METRIC`` when the search optimises another
  metric) and the trial's state in ``results``' words (``running``, then
  ``finished``, ``stopped at rung``, ``errored``, ...); ``add_run_summary`` adds
  values later (e.g. finalists' accuracy);
* runs are tagged with the spec's tags and name, grouped by the search name;
* ``offline`` works without an API key, and ``online`` without a key falls back
  to ``offline`` with a one-line notice;
* runs are written into the search folder (``results/NAME/wandb/``), so
  ``wandb sync results/NAME/wandb/offline-run-*`` uploads them later;
* a trial continued by ``--resume`` or retried after a failure continues its own
  run: the run id is the trial id and ``resume="allow"``;
* configs, logged values and the command line W&B records are scrubbed of
  secrets (``tune_llama.redact``); git metadata (remote URLs can hold tokens)
  and code are not recorded;
* each run is finished (flushed and closed) when its trial ends, and any still
  open when the search ends.
"""

from __future__ import annotations

import os
import sys
from numbers import Number
from pathlib import Path
from typing import Any, Optional

from ray.tune.logger import LoggerCallback

from tune_llama.redact import scrub
from tune_llama.results import ERRORED, INTERRUPTED, RUNNING, better, ended_state
from tune_llama.spec import Spec, apply_params, spec_from_dict

# silent: W&B's per-run banner would interleave with the search's progress table; errors still raise.
WANDB_SETTINGS = {"console": "off", "disable_git": True, "disable_code": True, "save_code": False, "silent": True}
BEST_LOSS = "best_eval_loss"
# Tune's bookkeeping in each result: not a metric of the trial, noise in W&B's charts.
NOT_METRICS = {"config", "done", "pid", "timestamp", "should_checkpoint", "training_iteration", "time_this_iter_s",
               "time_total_s", "time_since_restore", "iterations_since_restore", "timesteps_total",
               "timesteps_since_restore", "episodes_total", "episodes_this_iter", "date", "hostname", "node_ip",
               "trial_id", "experiment_id", "experiment_tag", "checkpoint_dir_name"}


def wandb_mode(spec: Spec) -> str:
    """``online`` without an API key falls back to ``offline``, with a one-line notice."""
    mode = spec.wandb.mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
        print("notice: no WANDB_API_KEY; logging W&B runs offline (upload later with `wandb sync`)",
              file=sys.stderr)
        return "offline"
    return mode


def callbacks(spec: Spec, search_name: str, spec_name: Optional[str] = None) -> list:
    """The search's W&B callback (none when W&B is disabled); ``spec_name`` (the spec file's stem) is a tag."""
    mode = wandb_mode(spec)
    if mode == "disabled":
        return []
    tags = list(dict.fromkeys([*spec.wandb.tags, *([spec_name] if spec_name else [])]))
    return [TrialRunsCallback(mode=mode, project=spec.wandb.project, entity=spec.wandb.entity, group=search_name,
                              tags=tags, metric=spec.search.metric, metric_mode=spec.search.mode,
                              spec=spec.to_dict())]


def search_folder(trial) -> Path:
    """The search folder the trial belongs to; W&B adds ``wandb/`` below it."""
    return Path(trial.path).parent


class TrialRunsCallback(LoggerCallback):
    def __init__(self, mode: str, project: str, group: str, entity: Optional[str] = None,
                 tags: Optional[list[str]] = None, metric: str = "eval_loss", metric_mode: str = "min",
                 spec: Optional[dict[str, Any]] = None):
        self.mode, self.project, self.entity, self.group = mode, project, entity, group
        self.tags = list(tags or [])
        self.metric, self.metric_mode = metric, metric_mode
        self.spec = spec  # the search's spec as a dict (picklable): each run's config is it, params applied
        self._last: dict[str, dict] = {}  # trial id -> its last result, for the final state
        self._runs: dict[str, Any] = {}  # trial id -> open wandb Run
        self._best: dict[str, dict[str, float]] = {}  # trial id -> summary key -> best value (kept across retries)

    def log_trial_start(self, trial) -> None:
        if trial.trial_id in self._runs:
            return  # a restarted trial keeps its open run
        self._runs[trial.trial_id] = open_run(
            project=self.project, entity=self.entity, group=self.group, tags=self.tags, mode=self.mode,
            id=trial.trial_id, name=str(trial), dir=str(search_folder(trial)), config=scrub(self.config(trial.config)))

    def config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's whole spec, flat, its sampled params applied (the params alone without a spec)."""
        if self.spec is None:
            return flatten(params)
        resolved = flatten(apply_params(spec_from_dict(self.spec), params).to_dict())
        # The distributions are the same for every run of the search, and nested: not a run's setting.
        return {k: v for k, v in resolved.items() if not k.startswith("search.space.")}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        self.log_trial_start(trial)
        run = self._runs[trial.trial_id]
        run.log(metrics(result), step=result.get("training_iteration"))
        self._last[trial.trial_id] = result
        run.summary.update({**self.best_so_far(trial.trial_id, result), "status": RUNNING})

    def log_trial_end(self, trial, failed: bool = False) -> None:
        run = self._runs.pop(trial.trial_id, None)
        if run is not None:
            run.summary.update({"status": self.final_state(trial.trial_id, failed)})
            run.finish(exit_code=1 if failed else 0)

    def final_state(self, trial_id: str, failed: bool) -> str:
        """How the trial ended, in ``results``' words (the summary, report and live table say the same)."""
        if failed:
            return ERRORED
        epochs = (self.spec or {}).get("training", {}).get("epochs", 0)
        return ended_state(self._last.get(trial_id, {}), epochs)

    def on_experiment_end(self, trials, **info) -> None:
        for trial_id in list(self._runs):  # every trial that ended has closed its run: these were cut short
            run = self._runs.pop(trial_id)
            run.summary.update({"status": INTERRUPTED})
            run.finish()

    def best_so_far(self, trial_id: str, result: dict) -> dict[str, float]:
        """``best_eval_loss`` (lowest) and ``best_METRIC`` (by the search's mode), updated with ``result``."""
        best = self._best.setdefault(trial_id, {})
        goals = {BEST_LOSS: ("eval_loss", "min")}
        if self.metric != "eval_loss":
            goals[f"best_{self.metric}"] = (self.metric, self.metric_mode)
        for key, (name, mode) in goals.items():
            value = result.get(name)
            if not isinstance(value, bool) and better(value, best.get(key), mode):
                best[key] = float(value)
        return dict(best)


def metrics(result: dict) -> dict[str, float]:
    """The numbers in a Tune result (the loop's metrics and Tune's timings), nested keys joined with ``/``."""
    flat = flatten({k: v for k, v in scrub(result).items() if k not in NOT_METRICS}, sep="/")
    return {k: v for k, v in flat.items() if isinstance(v, Number)}  # strings (status, hostname) are not metrics


def flatten(config: dict, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1e-3}}`` -> ``{"training.lr": 1e-3}``; already-flat keys stay as they are."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def add_run_summary(spec: Spec, search_dir: Path, trial_id: str, values: dict[str, Any]) -> None:
    """Add ``values`` (e.g. a finalist's test accuracy) to the summary of a trial's W&B run.

    Continues the run (same id, ``resume="allow"``). Offline, this writes a second ``offline-run-*-TRIALID``
    folder under ``results/NAME/wandb/``, which ``wandb sync`` uploads under the same run id.
    """
    mode = wandb_mode(spec)
    if mode == "disabled":
        return
    run = open_run(project=spec.wandb.project, entity=spec.wandb.entity, group=Path(search_dir).name, mode=mode,
                   id=trial_id, dir=str(search_dir))
    run.summary.update(scrub(values))
    run.finish()


def open_run(**init_kwargs):
    """``wandb.init`` for one trial's run, continued if it exists, beside any other open run."""
    import wandb
    argv = sys.argv
    sys.argv = scrub(argv)  # W&B records the command line (a --set value can hold a token) in the run's metadata
    try:
        return wandb.init(**init_kwargs, settings=wandb.Settings(**WANDB_SETTINGS),
                          resume="allow",  # same id on restore/retry: continue the run, not replace it
                          reinit="create_new")  # several trials run at once, each with its own run
    finally:
        sys.argv = argv


def _netrc_has_wandb() -> bool:
    import netrc
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
