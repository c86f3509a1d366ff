"""Compare a search's trials: ``tune-llama report results/NAME``.

Prints one row per trial, best first (params, status, epochs trained, best
validation loss and perplexity, time), the finalists' GSM8K accuracy when the
search scored finalists, and the parameter importance from the search's Optuna
study. Writes into ``results/NAME/report/``: ``trials.csv``, PNG plots
(validation loss and perplexity against epoch per trial, the metric against the
learning rate, parallel coordinates of the searched params, parameter
importance) and one self-contained ``report.html``. Reads the trial folders
directly, so it works on a running, interrupted or killed search too.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any, Optional

from tune_llama.finalists import comparison_text
from tune_llama.loop import DATA_COUNTS
from tune_llama.plots import Importance, all_plots
from tune_llama.progress_bar import format_value
from tune_llama.report_html import write_html
from tune_llama.results import ERRORED, OPTUNA_DB, Search, load_search
from tune_llama.summary import answer_lines, drawn_by_trial, sampler_line, warm_start_line


def trial_rows(search: Search) -> list[dict[str, Any]]:
    """One summary per trial, in the search's ranking (trials without a result last)."""
    ranked = [t for t, _ in search.ranked()]
    order = ranked + [t for t in search.trials if t not in ranked]
    kinds = drawn_by_trial(search)
    accuracy = {f["trial_id"]: f.get("strict_accuracy") for f in (search.finalists() or {}).get("finalists", [])}
    rows = []
    for trial in order:
        best = trial.best(search.metric, search.mode) or {}
        rows.append({
            "trial": trial.trial_id,
            **{key: trial.params.get(key) for key in search.spec.search.space},
            "status": search.status(trial),
            "drawn": kinds.get(trial.trial_id),
            "epochs": trial.epochs,
            "reports": len(trial.rows),
            "best_epoch": best.get("epoch"),
            "best_eval_loss": best.get("eval_loss"),
            "best_eval_perplexity": best.get("eval_perplexity"),
            "best_metric": best.get(search.metric),
            "finalist_strict_accuracy": accuracy.get(trial.trial_id),
            **{key: trial.rows[0].get(key) if trial.rows else None for key in DATA_COUNTS},
            "time_s": trial.time_s,
            "error": trial.error,
            "error_file": str(trial.error_file) if trial.error_file else None,
        })
    return rows


def format_table(search: Search, rows: list[dict[str, Any]]) -> str:
    params = list(search.spec.search.space)
    headers = ["trial", *[p.split(".")[-1] for p in params], "status", "drawn", "epochs", "best eval_loss",
               "best ppl", "best@epoch", "time"]
    lines = [[r["trial"], *[format_value(r[p], ".4g") for p in params], r["status"], r["drawn"] or "-",
              f"{r['epochs']:.2f}/{search.spec.training.epochs}", format_value(r["best_eval_loss"], ".4f"),
              format_value(r["best_eval_perplexity"], ".2f"), format_value(r["best_epoch"], ".4g"), f"{r['time_s']:.0f}s"]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    for r in rows:
        if r["status"] == ERRORED:
            out.append(f"{r['trial']}: {r['error'] or 'error'}" + (f"  ({r['error_file']})" if r["error_file"] else ""))
    return "\n".join(out)


def format_finalists(finalists: dict[str, Any]) -> str:
    lines = [f"finalists (GSM8K, {finalists.get('split', 'validation')} split, {finalists.get('limit')} problems):"]
    for entry in finalists.get("finalists", []):
        lines.append(f"  {entry['trial_id']}  strict {entry['strict_accuracy']:.1%} "
                     f"[{entry['strict_ci95'][0]:.1%}, {entry['strict_ci95'][1]:.1%}]  flexible "
                     f"{entry['flexible_accuracy']:.1%}  {entry['metric']}={entry['metric_value']:.4f}")
    if finalists.get("winner"):
        lines.append(f"  winner: {finalists['winner']['trial_id']}")
    if finalists.get("comparison"):
        lines.append(f"  {comparison_text(finalists['comparison'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- parameter importance

def param_importance(search: Search) -> Optional[Importance]:
    """Each searched param's importance for the metric (Optuna PED-ANOVA), over every trial with a result and
    its best report, or None below two such trials or two varied params. The search's study supplies the
    distributions; its trial states do not decide (a trial cut at a rung is pruned there, but how good its
    config looked is what importance is about)."""
    if len(search.spec.search.space) < 2 or not (search.path / OPTUNA_DB).is_file():
        return None
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = f"sqlite:///{search.path / OPTUNA_DB}"
    names = optuna.get_all_study_names(storage)  # one study per search; the folder may have been renamed
    if len(names) != 1:
        return None
    stored = optuna.load_study(study_name=names[0], storage=storage)
    space = set(search.spec.search.space)
    distributions = next((t.distributions for t in stored.trials if set(t.distributions) == space), None)
    ranked = search.ranked()
    if distributions is None or len(ranked) < 2:
        return None
    study = optuna.create_study(direction=stored.direction)
    for trial, row in ranked:
        try:
            study.add_trial(optuna.trial.create_trial(params={k: trial.params[k] for k in distributions},
                                                      distributions=distributions, value=row[search.metric]))
        except (KeyError, ValueError):  # a config outside the stored distributions (a changed space)
            continue
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError):  # e.g. every trial has the same params
        return None
    return Importance({k: float(v) for k, v in importance.items()}, len(study.trials))


def format_importance(importance: Importance) -> str:
    return f"parameter importance (Optuna PED-ANOVA, {importance.trials} trials){importance.caveat}:\n" + "\n".join(
        f"  {name:<40} {value:6.3f}" for name, value in sorted(importance.items(), key=lambda kv: -kv[1]))


def overlong_line(search: Search, rows: list[dict[str, Any]]) -> str:
    """What ``data.overlong`` did, from the trials' first reports: one line (the counts differ only when a data
    field is searched; then trials.csv has each trial's)."""
    counts = {tuple(r[k] for k in DATA_COUNTS) for r in rows if r[DATA_COUNTS[0]] is not None}
    data = search.spec.data
    head = f"examples over data.max_length={data.max_length} (data.overlong={data.overlong}): "
    if len(counts) == 1:
        (train_cut, train_dropped, val_cut, val_dropped), = counts
        return (head + f"train {train_cut} truncated, {train_dropped} dropped; "
                f"validation {val_cut} truncated, {val_dropped} dropped")
    return head + "they differ between trials, see trials.csv" if counts else ""


# ---------------------------------------------------------------- the report

def write_report(search_dir: Path) -> list[Path]:
    """Print the table, write the CSV, the plots and report.html; returns the files written."""
    search = load_search(search_dir)
    rows = trial_rows(search)
    finalists = search.finalists()
    importance = param_importance(search)
    print(f"search {search.name}: {len(rows)} trials, metric {search.metric} ({search.mode}), "
          f"training.epochs={search.spec.training.epochs}")
    print(format_table(search, rows) if rows else "no trial has started yet")
    for line in filter(None, [sampler_line(search), warm_start_line(search)]):
        print(line)
    for line in answer_lines(search):
        print(line)
    overlong = overlong_line(search, rows)
    if overlong:
        print(overlong)
    if finalists:
        print(format_finalists(finalists))
    if importance:
        print(format_importance(importance))
    out = search.path / "report"
    out.mkdir(exist_ok=True)
    written = [write_csv(rows, out / "trials.csv")]
    if any(math.isfinite(r["best_metric"]) for r in rows if isinstance(r["best_metric"], (int, float))):
        written += all_plots(search, importance, out)
    else:
        print("nothing to plot yet: no trial has reported a finite "
              f"{search.metric} (the search stopped before its first report)")
    written.append(write_html(search, rows, finalists, importance, written, out / "report.html", overlong))
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return written


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("search", type=Path, help="search folder, e.g. results/NAME")


def main(args: argparse.Namespace) -> int:
    write_report(args.search)
    return 0



if __name__ == "__main__":  # python -m tune_llama.report is tune-llama report
    from tune_llama.__main__ import run_command
    run_command("report")
