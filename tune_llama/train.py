"""Fine-tune one configuration, no Ray: ``python -m tune_llama.train SPEC [--set k=v] [--output DIR]``.

Writes ``DIR/metrics.jsonl`` (one line per epoch), ``DIR/summary.json`` and the
best model in HF format under ``DIR/best/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from tune_llama.cli import add_set_argument, run_cli
from tune_llama.loop import Run, fit, load_state, save_state, setup
from tune_llama.model import save_hf_model
from tune_llama.spec import load_spec


def summarize(history: list[dict], status: str) -> dict:
    """Best epoch and averages over a run's per-epoch metrics."""
    if not history:
        return {"status": status, "epochs": 0}
    best = min(history, key=lambda m: m["eval_loss"])
    mean = lambda key: sum(m[key] for m in history) / len(history)  # noqa: E731
    return {
        "status": status,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best_eval_loss": best["eval_loss"],
        "best_eval_perplexity": best["eval_perplexity"],
        "mean_tokens_per_s": mean("tokens_per_s"),
        "mean_epoch_time_s": mean("epoch_time_s"),
        "mean_checkpoint_time_s": mean("checkpoint_time_s"),
        "peak_memory_gb": max(m["peak_memory_gb"] for m in history),
        "total_time_s": sum(m["epoch_time_s"] + m["checkpoint_time_s"] for m in history),
    }


def train(spec, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    (output / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    metrics_file = output / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    best_state = output / "best_state"

    def save_if_best(run: Run) -> Optional[Path]:
        # Only the best epoch is worth keeping; its state is tiny for LoRA.
        return save_state(run, best_state) if run.best_epoch == run.epoch else None

    def report(metrics: dict, checkpoint: Optional[Path]) -> None:
        with metrics_file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
              flush=True)

    run = setup(spec)
    fit(run, save_checkpoint=save_if_best, report=report)
    summary = summarize(run.history, run.status)
    if best_state.exists():
        load_state(run, best_state, weights_only=True)
        save_hf_model(run.model, run.tokenizer, output / "best")
        shutil.rmtree(best_state)
        summary["best_model"] = str(output / "best")
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_llama.train", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="YAML spec, e.g. search_spaces/tiny.yaml")
    parser.add_argument("--output", type=Path, help="run directory (default results/runs/SPEC-TIME)")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    spec = load_spec(args.spec, args.overrides)
    output = args.output or Path("results/runs") / f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train(spec, output.resolve())
    print(json.dumps(summary, indent=1))
    return 0 if summary["status"] in ("completed", "early_stopped") else 1


if __name__ == "__main__":
    run_cli(main)
