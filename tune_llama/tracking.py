"""Weights & Biases logging for a search: one W&B run per trial, grouped by the search name.

Built on Ray's ``WandbLoggerCallback``, with these changes:

* ``offline`` works without an API key (Ray's callback insists on one), and
  ``online`` without a key falls back to ``offline`` with a one-line notice;
* runs are written into the search folder (``results/NAME/wandb/``), not the
  worker's working directory, so ``wandb sync results/NAME/wandb/offline-run-*``
  uploads them later;
* a trial continued by ``--resume`` (``Tuner.restore``) or retried after a
  failure continues its own run: the run id is the trial id and ``resume="allow"``
  (Ray passes ``resume=False``, which does not ask W&B to continue it);
* configs and logged values are scrubbed of secrets (``tune_llama.redact``), and
  git metadata (remote URLs can hold tokens) and code are not recorded;
* each run is flushed and closed before Ray ends its logging process, so no
  epoch is lost from the run's files; params are config, not per-step metrics.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

from tune_llama.redact import scrub
from tune_llama.spec import Spec

WANDB_SETTINGS = {"console": "off", "disable_git": True, "disable_code": True, "save_code": False}


def wandb_mode(spec: Spec) -> str:
    """``online`` without an API key falls back to ``offline``, with a one-line notice."""
    mode = spec.wandb.mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
        print("notice: no WANDB_API_KEY; logging W&B runs offline (upload later with `wandb sync`)",
              file=sys.stderr)
        return "offline"
    return mode


def callbacks(spec: Spec, search_name: str) -> list:
    mode = wandb_mode(spec)
    if mode == "disabled":
        return []
    return [TrialRunsCallback(project=spec.wandb.project, entity=spec.wandb.entity, group=search_name,
                              tags=list(spec.wandb.tags), mode=mode)]


def run_dir(trial) -> Path:
    """The search folder the trial belongs to; W&B adds ``wandb/`` below it."""
    return Path(trial.path).parent


class ScrubbedLoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging process, with secrets scrubbed from every logged value and config update."""

    def run(self):
        try:
            super().run()
        finally:
            # Ray kills this process as soon as run() returns, so W&B's atexit teardown never runs; without
            # it the run's last records (later epochs, the exit record) can stay unwritten in a buffer.
            self._wandb.teardown()

    def _handle_result(self, result):
        log, config_update = super()._handle_result(result)
        return scrub(log), scrub(config_update)


class TrialRunsCallback(WandbLoggerCallback):
    _logger_actor_cls = ScrubbedLoggingActor

    def __init__(self, mode: str, **kwargs):
        # log_config=False: the params still become the run's config (Ray copies each result's config
        # there); True would also log them as per-step metrics.
        super().__init__(mode=mode, log_config=False, **kwargs)
        self.mode = mode

    def setup(self, *args, **kwargs):
        if self.mode == "online":
            super().setup(*args, **kwargs)  # checks for an API key, which offline mode does not need

    def _start_logging_actor(self, trial, exclude_results, **init_kwargs):
        init_kwargs.update(
            dir=str(run_dir(trial)),
            resume="allow",  # same id (the trial id) on restore/retry: continue the run, not replace it
            config=scrub(init_kwargs.get("config", {})),
            settings=dict(WANDB_SETTINGS),
        )
        init_kwargs.pop("reinit", None)  # one run per logging process; Ray's reinit=True is deprecated in W&B
        super()._start_logging_actor(trial, exclude_results, **init_kwargs)

    def __del__(self):
        try:
            super().__del__()
        except (AttributeError, TypeError):
            pass  # at interpreter exit Ray's module globals are already None


def _netrc_has_wandb() -> bool:
    import netrc
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
