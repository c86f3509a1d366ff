"""Weights & Biases logging for a search: one W&B run per trial, grouped by the search name."""

from __future__ import annotations

import os
import sys

from tune_llama.spec import Spec


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
    from ray.air.integrations.wandb import WandbLoggerCallback
    return [WandbLoggerCallback(project=spec.wandb.project, entity=spec.wandb.entity, group=search_name,
                                tags=list(spec.wandb.tags), mode=mode, log_config=True)]


def _netrc_has_wandb() -> bool:
    import netrc
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
