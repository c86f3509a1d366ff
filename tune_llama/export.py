"""Export a search's best model: ``python -m tune_llama.export results/NAME [--out DIR] [--adapter-only]``.

Picks the trial with the best ``search.metric`` at any epoch and that trial's
best checkpoint, rebuilds the model on CPU, and writes a standard Hugging Face
directory (safetensors weights, LoRA merged into the base unless
``--adapter-only``, the tokenizer) plus ``export.json``: trial id, params,
epoch, metrics, the trial's spec and package versions. The result loads with
``AutoModelForCausalLM.from_pretrained(DIR)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tune_llama.errors import UserError
from tune_llama.cli import run_cli
from tune_llama.loop import METRIC_NAMES
from tune_llama.redact import scrub
from tune_llama.results import Search, Trial, load_search
from tune_llama.spec import Spec, spec_from_dict

EXPORT_FILE = "export.json"
PACKAGES = ("tune-llama", "torch", "transformers", "peft", "safetensors", "tokenizers", "ray", "optuna")


@dataclasses.dataclass
class Choice:
    """What gets exported: a trial, its checkpoint folder, and the epoch row that checkpoint holds."""
    trial: Trial
    checkpoint: Path
    row: dict[str, Any]
    spec: Spec


def choose(search: Search) -> Choice:
    """The best trial that has a checkpoint on disk, and its best checkpoint."""
    metric, mode = search.spec.search.metric, search.spec.search.mode
    if search.best() is None:
        raise UserError(f"{search.path}: no trial has reported a finite {metric} yet; nothing to export")
    ranked = sorted((t for t in search.trials if t.best_checkpoint(metric, mode)),
                    key=lambda t: t.best_epoch(metric, mode)[metric] * (1 if mode == "min" else -1))
    if not ranked:
        raise UserError(f"{search.path}: no trial has a checkpoint (checkpoint_*/trainable.safetensors) to export")
    best_trial = search.best()[0]
    trial = ranked[0]
    if trial is not best_trial:
        print(f"notice: the best trial {best_trial.trial_id} has no checkpoint on disk; "
              f"exporting {trial.trial_id}, the best one that has", file=sys.stderr)
    checkpoint, row = trial.best_checkpoint(metric, mode)
    spec_file = checkpoint / "spec.json"  # the trial's full spec, sampled params applied
    spec = spec_from_dict(json.loads(spec_file.read_text())) if spec_file.is_file() else search.trial_spec(trial)
    return Choice(trial, checkpoint, row, spec)


def rebuild(spec: Spec, checkpoint: Path):
    """(model, tokenizer) of a trial on CPU with the checkpoint's trainable weights loaded."""
    import torch
    from safetensors.torch import load_file
    from tune_llama.model import load_model, load_tokenizer, load_trainable_state

    # Quantization and checkpointing are training-time choices; export merges into full-precision weights.
    model_spec = dataclasses.replace(spec.model, quantization="none", gradient_checkpointing=False)
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, tokenizer, torch.device("cpu"), seed=spec.training.seed)
    load_trainable_state(model, load_file(checkpoint / "trainable.safetensors"))
    model.eval()
    return model, tokenizer


def export(experiment: Path, out: Path | None = None, adapter_only: bool = False) -> Path:
    """Write the best trial's model to ``out`` (default ``EXPERIMENT/export``); returns ``out``."""
    from tune_llama.model import save_hf_model

    search = load_search(experiment)
    choice = choose(search)
    if adapter_only and not choice.spec.model.lora.enabled:
        raise UserError(f"--adapter-only: trial {choice.trial.trial_id} trained every weight "
                        "(model.lora.enabled=false), so there is no adapter; export without --adapter-only")
    out = (out or search.path / "export").expanduser().resolve()
    if out.is_file():
        raise UserError(f"--out: {out} is a file; give a directory")
    model, tokenizer = rebuild(choice.spec, choice.checkpoint)
    save_hf_model(model, tokenizer, out, merge=not adapter_only)
    info = export_info(search, choice, adapter_only)
    (out / EXPORT_FILE).write_text(json.dumps(scrub(info), indent=1))
    return out


def export_info(search: Search, choice: Choice, adapter_only: bool) -> dict[str, Any]:
    return {
        "search": str(search.path),
        "trial_id": choice.trial.trial_id,
        "params": choice.trial.params,
        "checkpoint": str(choice.checkpoint),
        "epoch": choice.row["epoch"],
        "metric": {"name": search.spec.search.metric, "mode": search.spec.search.mode,
                   "value": choice.row[search.spec.search.metric]},
        "metrics": {k: choice.row[k] for k in METRIC_NAMES if k in choice.row},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_llama.export", description=__doc__.splitlines()[0])
    parser.add_argument("search", type=Path, help="search folder, e.g. results/NAME")
    parser.add_argument("--out", type=Path, help="output directory (default: SEARCH/export)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the LoRA adapter alone instead of merging it into the base weights")
    args = parser.parse_args(argv)
    out = export(args.search, args.out, args.adapter_only)
    info = json.loads((out / EXPORT_FILE).read_text())
    print(f"exported trial {info['trial_id']} (epoch {info['epoch']}, {info['metric']['name']}="
          f"{info['metric']['value']:.4f}) to {out}")
    print(f"evaluate: python -m tune_llama.evaluate {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
