"""The report's pictures: matplotlib figures, written as PNG (``tune_llama.report_html`` puts them in
``report.html``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from tune_llama.results import RUNG_STOPPED, FINISHED, Search, Trial, better

STATUS_STYLE = {FINISHED: "-", RUNG_STOPPED: "--"}  # anything else (running, errored, ...) is dotted
FEW_TRIALS = 8
"""Below this many finished trials, parameter importance is a guess: it is shown with ``FEW_TRIALS_NOTE``."""
FEW_TRIALS_NOTE = " (few trials: indicative only)"


class Importance(dict):
    """Each searched param's importance for the metric, and how many finished trials it rests on."""

    def __init__(self, values: dict[str, float], trials: int):
        super().__init__(values)
        self.trials = trials

    @property
    def caveat(self) -> str:
        return FEW_TRIALS_NOTE if self.trials < FEW_TRIALS else ""


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def save(fig, out: Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]  # outside the axes: enlarge the image
    fig.savefig(out, bbox_inches="tight", bbox_extra_artists=legends)
    plt.close(fig)
    return out


def outside_legend(ax, fontsize: int) -> None:
    """A legend under the axes, never over the curves, in two columns past six entries. Out of tight_layout,
    which would shrink the axes to make room for it; ``save`` makes the image taller instead, never wider
    (the report shows each plot at its own width)."""
    entries = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.13), borderaxespad=0,
              ncol=1 if entries <= 6 else 2).set_in_layout(False)


def short_params(trial: Trial) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in trial.params.items())


def all_plots(search: Search, importance: Optional[Importance], out: Path) -> list[Path]:
    written = [curves(search, "eval_loss", out / "eval_loss.png"),
               curves(search, "eval_perplexity", out / "eval_perplexity.png", log_y=True),
               save(best_so_far_figure([("this search", spent_and_best(search), "C0")],
                                       title=f"{search.name}: best {search.metric} so far against compute",
                                       metric=search.metric), out / "best_so_far.png")]
    for path in (metric_vs_lr(search, out / f"{search.metric}_vs_lr.png"),
                 parallel_coordinates(search, out / "parallel_coordinates.png"),
                 importance_bars(importance, out / "param_importance.png") if importance else None):
        if path:
            written.append(path)
    return written


def plain_log_ticks(axis) -> None:
    """A log axis labelled in plain numbers (``5``, ``20``, ``0.5``), not matplotlib's default ``5×10^0``; which
    ticks get a label stays matplotlib's choice (every minor tick on an axis shorter than a decade)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain(labelOnlyBase=False))
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def curves(search: Search, key: str, out: Path, log_y: bool = False) -> Path:
    return save(curves_figure(search, key, log_y), out)


def curves_figure(search: Search, key: str, log_y: bool = False):
    """``key`` against the fractional epoch, one line per trial; rung-stopped trials dashed, ending in x."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for trial in search.trials:
        points = [(r["epoch"], r[key]) for r in trial.rows if finite(r.get(key))]
        if not points:
            continue
        status = search.status(trial)
        xs, ys = zip(*points)
        ax.plot(xs, ys, STATUS_STYLE.get(status, ":"), marker="o", markersize=3,
                label=f"{trial.trial_id} ({status}) {short_params(trial)}")
        ax.plot(xs[-1], ys[-1], "x" if status == RUNG_STOPPED else "o", color=ax.lines[-1].get_color(), markersize=8)
    ax.set_xlim(0, max([search.spec.training.epochs, *(t.epochs for t in search.trials)]) + 0.1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    if log_y:
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    ax.set_title(f"{search.name}: {key} per report (dashed, x: {RUNG_STOPPED})")
    ax.grid(alpha=0.3)
    if ax.lines:
        outside_legend(ax, fontsize=7)
    return fig


def spent_and_best(search: Search) -> list[tuple[float, float]]:
    """(compute spent in runs, the best ``search.metric`` reported so far) after each report, in the order the
    reports came (a run: ``training.epochs``; a trial's report costs the epochs since its previous one)."""
    events = []
    for trial in search.trials:
        previous = 0.0
        for row in trial.rows:
            events.append((row.get("timestamp", 0), trial.trial_id, row["epoch"] - previous, row.get(search.metric)))
            previous = row["epoch"]
    spent, best, points = 0.0, None, []
    for _, _, epochs, value in sorted(events, key=lambda e: (e[0], e[1])):
        spent += epochs
        if better(value, best, search.mode):
            best = value
        if best is not None:
            points.append((spent / search.spec.training.epochs, best))
    return points


def best_so_far_figure(lines: list[tuple[str, list[tuple[float, float]], str]], title: str,
                       metric: str = "eval_loss"):
    """Best value so far against compute in runs, a step line per (label, points, colour); one full run
    marked, where a search that pays should already stand below the recipe's single run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    labelled = set()
    for label, points, color in lines:
        if not points:
            continue
        xs, ys = zip(*points)
        ax.step(xs, ys, where="post", color=color, alpha=0.8, label=None if label in labelled else label)
        labelled.add(label)
    ax.axvline(1.0, color="grey", linestyle=":", label="one full run")
    ax.set_xlabel("compute spent (runs of training.epochs)")
    ax.set_ylabel(f"best {metric} so far")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    outside_legend(ax, fontsize=8)
    return fig


def best_points(search: Search) -> list[tuple[Trial, float, str]]:
    """(trial, its best metric, status) for every trial with a finite metric."""
    return [(t, row[search.metric], search.status(t)) for t, row in search.ranked()]


def metric_vs_lr(search: Search, out: Path) -> Optional[Path]:
    """Each trial's best metric against its learning rate (log x); None when lr was not searched."""
    if "training.lr" not in search.spec.search.space:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    by_status: dict[str, list[tuple[float, float]]] = {}
    for trial, value, status in best_points(search):
        if finite(trial.params.get("training.lr")):
            by_status.setdefault(status, []).append((trial.params["training.lr"], value))
    for status, points in sorted(by_status.items()):
        xs, ys = zip(*points)
        ax.scatter(xs, ys, label=status, marker="x" if status == RUNG_STOPPED else "o")
    ax.set_xscale("log")
    ax.set_xlabel("training.lr")
    ax.set_ylabel(f"best {search.metric}")
    ax.set_title(f"{search.name}: best {search.metric} against learning rate")
    ax.grid(alpha=0.3, which="both")
    if by_status:
        outside_legend(ax, fontsize=8)
    return save(fig, out)


def axis_values(search: Search, key: str, trials: list[Trial]) -> tuple[list[float], list[str], list[float]]:
    """A param's values scaled to [0, 1] (log for loguniform, by position for choices), with tick labels."""
    dist = search.spec.search.space[key]
    (kind, args), = dist.items()
    values = [t.params.get(key) for t in trials]
    if kind == "choice":
        positions = {str(c): i for i, c in enumerate(args)}
        top = max(len(args) - 1, 1)
        return ([positions.get(str(v), 0) / top for v in values], [str(a) for a in args],
                [i / top for i in range(len(args))])
    low, high = float(args[0]), float(args[1])
    scale = (lambda v: math.log(v)) if kind == "loguniform" else (lambda v: float(v))  # noqa: E731
    span = (scale(high) - scale(low)) or 1.0
    return ([(scale(v) - scale(low)) / span if finite(v) else 0.0 for v in values], [f"{low:.3g}", f"{high:.3g}"],
            [0.0, 1.0])


def parallel_coordinates(search: Search, out: Path) -> Optional[Path]:
    """One line per trial through its searched params and its best metric, coloured by the metric."""
    points = best_points(search)
    keys = list(search.spec.search.space)
    if not points or not keys:
        return None
    plt = pyplot()
    trials = [t for t, _, _ in points]
    metric_values = [v for _, v, _ in points]
    low, high = min(metric_values), max(metric_values)
    columns = [axis_values(search, key, trials) for key in keys]
    metric_axis = [(v - low) / ((high - low) or 1.0) for v in metric_values]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * (len(keys) + 1)), 5), dpi=100)
    cmap = plt.get_cmap("viridis_r" if search.mode == "min" else "viridis")
    for i, trial in enumerate(trials):
        ys = [column[0][i] for column in columns] + [metric_axis[i]]
        ax.plot(range(len(ys)), ys, color=cmap(1 - metric_axis[i]), alpha=0.8, marker="o", markersize=3)
    for x, (_, labels, ticks) in enumerate(columns):
        ax.axvline(x, color="grey", lw=0.5)
        for label, tick in zip(labels, ticks):
            ax.annotate(label, (x, tick), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.axvline(len(keys), color="grey", lw=0.5)
    ax.annotate(f"{low:.4g}", (len(keys), 0), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.annotate(f"{high:.4g}", (len(keys), 1), fontsize=7, xytext=(3, 0), textcoords="offset points")
    ax.set_xticks(range(len(keys) + 1), [k.split(".")[-1] for k in keys] + [f"best {search.metric}"])
    ax.set_yticks([])
    ax.set_title(f"{search.name}: searched params against best {search.metric} (dark = better)")
    return save(fig, out)


def importance_bars(importance: Importance, out: Path) -> Path:
    plt = pyplot()
    names = sorted(importance, key=importance.get)
    fig, ax = plt.subplots(figsize=(7, max(3.5, 1 + 0.5 * len(names))), dpi=100)
    ax.barh(names, [importance[n] for n in names])
    ax.set_xlabel("importance (Optuna PED-ANOVA)")
    ax.set_title(f"which searched parameter mattered{importance.caveat}")
    return save(fig, out)
