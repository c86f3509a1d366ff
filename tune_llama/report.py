"""Compare a search's trials: ``python -m tune_llama.report results/NAME``.

Prints one row per trial (params, status, epochs run, best eval loss and
perplexity, time used) and writes PNG plots to ``results/NAME/report/``: eval
loss and eval perplexity against epoch for every trial (trials ASHA stopped end
early, drawn dashed), and the best metric against the learning rate when
``training.lr`` was searched. Reads the trial folders directly, so it works on a
search that is still running or was interrupted.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any, Optional

from tune_llama.cli import run_cli
from tune_llama.results import ASHA_STOPPED, ERRORED, FINISHED, Search, Trial, load_search

STATUS_STYLE = {FINISHED: "-", ASHA_STOPPED: "--"}  # anything else (running, errored, ...) is dotted


def trial_rows(search: Search) -> list[dict[str, Any]]:
    """One summary per trial, best first (trials with no result last)."""
    metric, mode = search.spec.search.metric, search.spec.search.mode
    max_epochs = search.spec.training.epochs
    rows = []
    for trial in search.trials:
        best = trial.best_epoch(metric, mode) or {}
        rows.append({
            "trial": trial.trial_id,
            **{key: trial.params.get(key) for key in search.spec.search.space},
            "status": trial.status(max_epochs),
            "epochs": len(trial.epochs),
            "best_epoch": best.get("epoch"),
            "best_eval_loss": best.get("eval_loss"),
            "best_eval_perplexity": best.get("eval_perplexity"),
            "best_metric": best.get(metric),
            "time_s": trial.time_s,
            "error": trial.error,
        })
    worst = math.inf if mode == "min" else -math.inf
    rows.sort(key=lambda r: (r["best_metric"] is None, (r["best_metric"] if r["best_metric"] is not None else worst)
                             * (1 if mode == "min" else -1)))
    return rows


def format_table(search: Search, rows: list[dict[str, Any]]) -> str:
    max_epochs = search.spec.training.epochs
    params = list(search.spec.search.space)
    headers = ["trial", *[p.split(".")[-1] for p in params], "status", "epochs", "best eval_loss",
               "best ppl", "best@", "time"]
    lines = []
    for r in rows:
        lines.append([r["trial"], *[format_value(r[p]) for p in params], r["status"],
                      f"{r['epochs']}/{max_epochs}", format_value(r["best_eval_loss"], ".4f"),
                      format_value(r["best_eval_perplexity"], ".2f"), format_value(r["best_epoch"]),
                      f"{r['time_s']:.0f}s"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    for r in rows:
        if r["status"] == ERRORED and r["error"]:
            out.append(f"{r['trial']}: {r['error']}")
    return "\n".join(out)


def format_value(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec) if spec else f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- plots

def plot_curves(search: Search, key: str, out: Path, log_y: bool = False) -> Path:
    """``key`` against epoch, one line per trial; the x axis always spans training.epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    max_epochs = search.spec.training.epochs
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for trial in search.trials:
        points = [(r["epoch"], r[key]) for r in trial.epochs
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not points:
            continue
        status = trial.status(max_epochs)
        xs, ys = zip(*points)
        ax.plot(xs, ys, STATUS_STYLE.get(status, ":"), marker="o", markersize=4,
                label=f"{trial.trial_id} ({status}) {short_params(trial)}")
        ax.plot(xs[-1], ys[-1], "x" if status == ASHA_STOPPED else "o", color=ax.lines[-1].get_color(), markersize=9)
    ax.set_xlim(0.8, max_epochs + 0.2)
    ax.set_xticks(range(1, max_epochs + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(f"{search.name}: {key} per epoch (dashed, x: stopped by ASHA)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    return save(fig, out)


def plot_metric_vs_lr(search: Search, out: Path) -> Optional[Path]:
    """Each trial's best metric against its learning rate (log x); None when lr was not searched."""
    if "training.lr" not in search.spec.search.space:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = search.spec.search.metric, search.spec.search.mode
    max_epochs = search.spec.training.epochs
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    by_status: dict[str, list[tuple[float, float]]] = {}
    for trial in search.trials:
        best, lr = trial.best_epoch(metric, mode), trial.params.get("training.lr")
        if best is not None and isinstance(lr, (int, float)):
            by_status.setdefault(trial.status(max_epochs), []).append((lr, best[metric]))
    for status, points in sorted(by_status.items()):
        xs, ys = zip(*points)
        ax.scatter(xs, ys, label=status, marker="x" if status == ASHA_STOPPED else "o")
    ax.set_xscale("log")
    ax.set_xlabel("training.lr")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{search.name}: best {metric} against learning rate")
    ax.grid(alpha=0.3, which="both")
    if by_status:
        ax.legend(fontsize=8)
    return save(fig, out)


def save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def short_params(trial: Trial) -> str:
    return " ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in trial.params.items())


# ---------------------------------------------------------------- the report

def report(experiment: Path) -> list[Path]:
    """Print the table, write the CSV and the plots; returns the files written."""
    search = load_search(experiment)
    rows = trial_rows(search)
    print(f"search {search.name}: {len(rows)} trials, metric {search.spec.search.metric} "
          f"({search.spec.search.mode}), training.epochs={search.spec.training.epochs}")
    print(format_table(search, rows) if rows else "no trial has started yet")
    out = search.path / "report"
    out.mkdir(exist_ok=True)
    written = [write_csv(rows, out / "trials.csv"),
               plot_curves(search, "eval_loss", out / "eval_loss.png"),
               plot_curves(search, "eval_perplexity", out / "eval_perplexity.png", log_y=True)]
    lr_plot = plot_metric_vs_lr(search, out / f"{search.spec.search.metric}_vs_lr.png")
    written += [lr_plot] if lr_plot else []
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return written


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_llama.report", description=__doc__.splitlines()[0])
    parser.add_argument("search", type=Path, help="search folder, e.g. results/NAME")
    args = parser.parse_args(argv)
    report(args.search)
    return 0


if __name__ == "__main__":
    run_cli(main)
