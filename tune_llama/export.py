"""Export a search's best model: ``tune-llama export results/NAME [--out DIR] [--by finalists|loss] [--adapter-only]``.

Picks the finalists' winner (GSM8K accuracy) when the search scored finalists,
else the best checkpoint on disk by ``search.metric`` (any report, not only
the last), rebuilds the model on CPU, and writes a standard Hugging Face
directory (safetensors weights, LoRA merged into the base unless
``--adapter-only``, the tokenizer) plus ``export.json``: trial id, params,
epoch, metrics, the trial's spec and package versions. The result loads with
``AutoModelForCausalLM.from_pretrained(DIR)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tune_llama.checkpoint import read_metrics, read_spec
from tune_llama.cli import shell_path
from tune_llama.errors import UserError
from tune_llama.loop import METRIC_NAMES
from tune_llama.redact import scrub
from tune_llama.results import FINALISTS_FILE, Search, Trial, load_search
from tune_llama.spec import Spec

EXPORT_FILE = "export.json"
PACKAGES = ("tune-llama", "torch", "transformers", "peft", "safetensors", "tokenizers", "ray", "optuna")


@dataclasses.dataclass
class Choice:
    """What gets exported: a trial, its checkpoint, the report that checkpoint holds, and why it was chosen."""
    trial: Trial
    checkpoint: Path
    row: dict[str, Any]
    spec: Spec
    reason: str


def choose(search: Search, by: str = "finalists") -> Choice:
    """The finalists' winner when the search scored finalists (and ``by`` is ``finalists``), else the best
    checkpoint on disk by ``search.metric``: each checkpoint is ranked by the metrics it holds itself, so
    one written just before a kill, that Ray's result files do not list yet, still counts."""
    winner = search.finalists().get("winner") if by == "finalists" and search.finalists() else None
    if winner:
        trial = next((t for t in search.trials if t.trial_id == winner["trial_id"]), None)
        checkpoint = Path(winner["checkpoint"])
        metrics = read_metrics(checkpoint)
        if trial is None or metrics is None:
            raise UserError(f"{search.path / FINALISTS_FILE}: the winner's checkpoint {checkpoint} is gone; "
                            "export with --by loss")
        reason = f"finalists' winner by GSM8K strict accuracy ({winner['strict_accuracy']:.1%})"
    else:
        best = search.best_checkpoint()
        if best is None:
            raise UserError(f"{search.path}: no trial has a checkpoint with a finite {search.metric} "
                            "(checkpoint_*/ with weights and metrics); nothing to export")
        trial, found = best
        checkpoint, metrics = found.path, found.metrics
        reason = f"best checkpoint by {search.metric} ({search.mode})"
        best_trial = search.best()
        if best_trial and best_trial[0] is not trial:
            print(f"notice: the best trial {best_trial[0].trial_id} has no checkpoint of its best report on disk; "
                  f"exporting {trial.trial_id}, the best checkpoint there is", file=sys.stderr)
    spec = read_spec(checkpoint) or search.trial_spec(trial)  # the trial's full spec, sampled params applied
    return Choice(trial, checkpoint, metrics, spec, reason)


def export(search_dir: Path, out: Path | None = None, adapter_only: bool = False, by: str = "finalists") -> Path:
    """Write the chosen trial's model to ``out`` (default ``EXPERIMENT/export``); returns ``out``.

    Written into a temporary sibling folder and renamed at the end: an interrupted export never leaves a
    folder that looks complete, and a finished one replaces the previous export whole.
    """
    import torch
    from tune_llama.checkpoint import load_model
    from tune_llama.model import save_hf_model

    search = load_search(search_dir)
    choice = choose(search, by)
    if adapter_only and not choice.spec.model.lora.enabled:
        raise UserError(f"--adapter-only: trial {choice.trial.trial_id} trained every weight "
                        "(model.lora.enabled=false), so there is no adapter; export without --adapter-only")
    out = (out or search.path / "export").expanduser().resolve()
    if out.is_file():
        raise UserError(f"--out: {out} is a file; give a directory")
    model, tokenizer = load_model(choice.spec.model, choice.checkpoint, torch.device("cpu"),
                                  seed=choice.spec.training.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        save_hf_model(model, tokenizer, partial, merge=not adapter_only)  # also undoes mkdtemp's 0700
        info = export_info(search, choice, adapter_only)
        (partial / EXPORT_FILE).write_text(json.dumps(scrub(info), indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def export_info(search: Search, choice: Choice, adapter_only: bool) -> dict[str, Any]:
    return {
        "search": str(search.path),
        "trial_id": choice.trial.trial_id,
        "params": choice.trial.params,
        "checkpoint": str(choice.checkpoint),
        "reason": choice.reason,
        "report": choice.row.get("report"),
        "step": choice.row.get("step"),
        "epoch": choice.row.get("epoch"),
        "metric": {"name": search.spec.search.metric, "mode": search.spec.search.mode,
                   "value": choice.row.get(search.spec.search.metric)},
        "metrics": {k: choice.row[k] for k in METRIC_NAMES if k in choice.row},
        "finalists": search.finalists(),
        "adapter_only": adapter_only,
        "spec": choice.spec.to_dict(),
        "versions": package_versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("search", type=Path, help="search folder, e.g. results/NAME")
    parser.add_argument("--out", type=Path, help="output directory (default: SEARCH/export)")
    parser.add_argument("--by", choices=("finalists", "loss"), default="finalists",
                        help="pick the finalists' winner by GSM8K accuracy when there is one (default), "
                             "or the best checkpoint by the search metric")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the LoRA adapter alone instead of merging it into the base weights")


def main(args: argparse.Namespace) -> int:
    out = export(args.search, args.out, args.adapter_only, args.by)
    info = json.loads((out / EXPORT_FILE).read_text())
    value = info["metric"]["value"]
    print(f"exported trial {info['trial_id']} (report {info['report']}, epoch {info['epoch']}, "
          f"{info['metric']['name']}={value:.4f}; {info['reason']}) to {out}")
    print(f"evaluate: {evaluate_command(out, info['spec']['data']['source'])}")
    return 0


def evaluate_command(out: Path, source: str) -> str:
    """The ``evaluate`` line that scores the export on the data its search trained on (the hub's GSM8K is
    evaluate's default; a local folder or the embedded slice must be named, or the line fails offline)."""
    from tune_llama.evaluate import HUB_GSM8K
    if source == HUB_GSM8K:
        return f"tune-llama evaluate {shell_path(out)}"
    data = shell_path(source) if Path(source).is_absolute() else source
    return f"tune-llama evaluate {shell_path(out)} --data {data}"



if __name__ == "__main__":  # python -m tune_llama.export is tune-llama export
    from tune_llama.__main__ import run_command
    run_command("export")
