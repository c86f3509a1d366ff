"""Fine-tune one configuration of a spec, without Ray: ``tune-llama train SPEC [--set k=v] [--output DIR]``.

Writes ``DIR/metrics.jsonl`` (one line per report), ``DIR/summary.json`` and
the best model in HF format under ``DIR/best/``. Checks the same things a
search checks before it starts, with the same one-line errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from tune_llama.cli import add_set_argument
from tune_llama.checkpoint import load_state, save_state
from tune_llama.loop import DATA_COUNTS, TrainingRun, fit, setup
from tune_llama.model import save_hf_model
from tune_llama.preflight import preflight
from tune_llama.progress_bar import Progress
from tune_llama.results import best_row
from tune_llama.spec import Spec, load_spec


def training_summary(history: list[dict], status: str, metric: str, mode: str) -> dict:
    """The best report (by the search metric, as a search would rank it) and averages over a run's reports."""
    best = best_row(history, metric, mode)
    if best is None:
        return {"status": status, "reports": len(history)}
    mean = lambda key: sum(m[key] for m in history) / len(history)  # noqa: E731
    return {
        "status": status,
        "reports": len(history),
        "epochs": history[-1]["epoch"],
        "metric": metric,
        "best_report": best["report"],
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "best_metric": best[metric],
        "best_eval_loss": best["eval_loss"],
        "best_eval_perplexity": best["eval_perplexity"],
        "mean_tokens_per_s": mean("tokens_per_s"),
        "eval_share": history[-1]["eval_share"],
        "mean_checkpoint_time_s": mean("checkpoint_time_s"),
        "peak_memory_gb": max(m["peak_memory_gb"] for m in history),
        "total_time_s": sum(m["train_time_s"] + m["eval_time_s"] + m["checkpoint_time_s"] for m in history),
    }


def train(spec: Spec, output: Path, spec_file: Optional[str] = None) -> dict:
    checked = preflight(spec, spec_file)  # before the run folder: refused input leaves nothing behind
    output.mkdir(parents=True, exist_ok=True)
    (output / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    metrics_file = output / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    best_state = output / "best_state"
    metric, mode = spec.search.metric, spec.search.mode

    def save_if_best(run: TrainingRun) -> Optional[Path]:
        # Only the best report is worth keeping; its state is tiny for LoRA.
        return save_state(run, best_state) if best_row(run.history, metric, mode) is run.history[-1] else None

    def report(metrics: dict, checkpoint: Optional[Path]) -> None:
        with metrics_file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    run = setup(spec, tokenizer=checked.tokenizer, data=(checked.train, checked.val))
    # A bar (plain lines in a log) over optimizer steps: an epoch can take many minutes between reports.
    with Progress(run.total_steps, "train", "step", initial=run.step) as bar:
        fit(run, save_checkpoint=save_if_best, report=report, on_step=lambda _: bar.update(1))
    summary = training_summary(run.history, run.status, metric, mode)
    if best_state.exists():
        load_state(run, best_state, weights_only=True)
        save_hf_model(run.model, run.tokenizer, output / "best")
        shutil.rmtree(best_state)
        summary["best_model"] = str(output / "best")
    summary.update({key: run.history[0][key] for key in DATA_COUNTS if run.history and key in run.history[0]})
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="YAML spec, e.g. search_spaces/tiny.yaml")
    parser.add_argument("--output", type=Path, help="run directory (default results/runs/SPEC-TIME)")
    add_set_argument(parser)


def main(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    output = args.output or Path("results/runs") / f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train(spec, output.resolve(), args.spec)
    print(json.dumps(summary, indent=1))
    return 0 if summary["status"] in ("completed", "early_stopped") else 1



if __name__ == "__main__":  # python -m tune_llama.train is tune-llama train
    from tune_llama.__main__ import run_command
    run_command("train")
