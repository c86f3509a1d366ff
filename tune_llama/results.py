"""The search folder (``results/NAME``): what is in it, read while it runs or after it stopped, and
the one ranking of trials and checkpoints that the summary, export, report and single runs share.

    results/NAME/tune_llama_spec.json    the search's spec (written before Ray starts)
    results/NAME/driver.json             pid and host of the search process (gone driver: interrupted)
    results/NAME/driver.lock             locked while that process runs (``tune_llama.driver``)
    results/NAME/optuna.db               the Optuna study
    results/NAME/summary.txt             the search's closing summary
    results/NAME/finalists.json          GSM8K accuracy of the best trials, when ``search.finalists`` is on
    results/NAME/stopped_by_same_error.txt   why the search stopped, when trials kept failing the same way
    results/NAME/<trial folder>/         params.json, result.json (one row per report), checkpoint_*/

Ray Tune's own readers need a consistent experiment state; a search that is
still running, was killed or is being resumed may not have one. So the trials
come from their folders, and each checkpoint from its own ``metrics.json``;
Ray's experiment state (read in ``ray_private``) only adds what the files
cannot say: whether a trial errored, is pending, or was ended by the scheduler.
No Ray import: export and report also run where Ray is not installed.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from tune_llama import checkpoint
from tune_llama.driver import DRIVER_FILE, driver_alive, process_alive, write_driver_file  # noqa: F401
from tune_llama.errors import SpecError, UserError
from tune_llama.paths import read_json
from tune_llama.ray_private import read_trial_states, trial_id_from_name, trial_sequence_number
from tune_llama.spec import Spec, apply_params, field_value, searched_values, spec_from_dict

SPEC_FILE = "tune_llama_spec.json"
OPTUNA_DB = "optuna.db"
SUMMARY_FILE = "summary.txt"
FINALISTS_FILE = "finalists.json"
SAME_ERROR_FILE = "stopped_by_same_error.txt"  # trials failing the same way stopped the search: the line to print

# ---------------------------------------------------------------- the one vocabulary of trial states

# The words every reader prints for a trial: the summary, the live table, the report and W&B.
FINISHED, RUNG_STOPPED, EARLY_STOPPED, DIVERGED = "finished", "stopped at rung", "early stopped", "diverged"
ERRORED, RUNNING, PENDING, INTERRUPTED = "errored", "running", "pending", "interrupted"
WAITING = "waiting at rung"  # paused by the halving scheduler until its rung holds enough results
NO_RESULT = "ended without a result"
NORMAL_ENDS = (FINISHED, RUNG_STOPPED, EARLY_STOPPED, DIVERGED)
TRIAL_STATES = (*NORMAL_ENDS, ERRORED, RUNNING, WAITING, PENDING, INTERRUPTED, NO_RESULT)


def ended_state(last_report: dict[str, Any], max_epochs: float) -> str:
    """How a trial that ended without an error ended, from its last report: the loop's own run status
    (``completed``, ``early_stopped``, ``diverged``: a report's ``status``) first, else by how far it got;
    short of ``training.epochs`` and not stopped by the loop, the scheduler (ASHA) stopped it."""
    loop_status = last_report.get("status")
    if loop_status == "diverged":
        return DIVERGED
    if loop_status == "early_stopped":
        return EARLY_STOPPED
    if loop_status == "completed" or float(last_report.get("epoch", 0.0)) >= max_epochs - 1e-9:
        return FINISHED
    return RUNG_STOPPED


T = TypeVar("T")


# ---------------------------------------------------------------- the one notion of "better", the one ranking

def better(value: Any, than: Any, mode: str) -> bool:
    """Whether ``value`` is a finite metric better than ``than`` by ``mode`` (anything beats no value)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        return False
    return than is None or (value < than if mode == "min" else value > than)


def sort_key(value: float, mode: str) -> float:
    """Ascending order of this key is best first."""
    return value if mode == "min" else -value


def rank(items: Iterable[T], metric: str, mode: str,
         row: Callable[[T], Optional[dict[str, Any]]] = lambda item: item) -> list[T]:  # type: ignore[assignment,return-value]
    """``items`` whose ``row(item)[metric]`` is finite, best first; ties keep the order given."""
    scored = []
    for order, item in enumerate(items):
        values = row(item)
        value = values.get(metric) if values else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((sort_key(value, mode), order, item))
    scored.sort(key=lambda s: (s[0], s[1]))
    return [item for _, _, item in scored]


def best_row(rows: Iterable[dict[str, Any]], metric: str, mode: str) -> Optional[dict[str, Any]]:
    ranked = rank(rows, metric, mode)
    return ranked[0] if ranked else None


# ---------------------------------------------------------------- trials and checkpoints

@dataclass
class Checkpoint:
    path: Path
    metrics: dict[str, Any]
    """The report the checkpoint was taken at, as the checkpoint itself recorded it."""


@dataclass
class Trial:
    trial_id: str
    path: Optional[Path]
    """The trial's folder; None while Ray has not started it."""
    params: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One row per report (the loop's metrics plus Ray's fields), in order."""
    ray_status: Optional[str] = None
    """TERMINATED, ERROR, RUNNING, PENDING or PAUSED from Ray's state; None when it has none."""
    error: Optional[str] = None
    """The first line of the trial's error, when it errored."""
    error_file: Optional[Path] = None

    def best(self, metric: str, mode: str) -> Optional[dict[str, Any]]:
        """The report with the best finite ``metric`` (not only the last), or None."""
        return best_row(self.rows, metric, mode)

    def checkpoints(self) -> list[Checkpoint]:
        """Checkpoints on disk, oldest first, each with the metrics it holds."""
        if self.path is None:
            return []
        by_name = {r.get("checkpoint_dir_name"): r for r in self.rows}
        found = []
        for folder in checkpoint.folders(self.path):
            if not checkpoint.holds_weights(folder):
                continue
            metrics = checkpoint.read_metrics(folder) or by_name.get(folder.name)
            if metrics:
                found.append(Checkpoint(folder, metrics))
        return found

    def best_checkpoint(self, metric: str, mode: str) -> Optional[Checkpoint]:
        ranked = rank(self.checkpoints(), metric, mode, row=lambda c: c.metrics)
        return ranked[0] if ranked else None

    @property
    def time_s(self) -> float:
        """Wall time the trial has used (Ray's ``time_total_s`` of its last report)."""
        return float(self.rows[-1].get("time_total_s", 0.0)) if self.rows else 0.0

    @property
    def epochs(self) -> float:
        """Epochs trained, fractional."""
        return float(self.rows[-1].get("epoch", 0.0)) if self.rows else 0.0

    def status(self, max_epochs: int, driver_alive: bool = True) -> str:
        """finished / stopped at rung / early stopped / diverged / errored / running / waiting at rung /
        pending / interrupted."""
        last = self.rows[-1] if self.rows else {}
        if self.ray_status == "ERROR":
            return ERRORED
        if not self.rows:
            if self.ray_status == "TERMINATED":
                return NO_RESULT
            if not driver_alive:
                return INTERRUPTED
            return RUNNING if self.ray_status == "RUNNING" else PENDING
        ended = ended_state(last, max_epochs)
        if ended != RUNG_STOPPED:
            return ended
        if self.ray_status == "TERMINATED" or (self.ray_status is None and last.get("done")):
            return RUNG_STOPPED  # Tune ended it before training.epochs and the loop did not
        if self.ray_status == "PAUSED":  # its process was stopped on purpose: it goes on from its checkpoint
            return WAITING if driver_alive else INTERRUPTED
        if not driver_alive or not process_alive(last):  # the worker that last reported
            return INTERRUPTED
        return PENDING if self.ray_status == "PENDING" else RUNNING


@dataclass
class Search:
    path: Path
    spec: Spec
    trials: list[Trial]
    driver_alive: bool = False
    """Whether the process that runs (ran) the search is still there."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metric(self) -> str:
        return self.spec.search.metric

    @property
    def mode(self) -> str:
        return self.spec.search.mode

    def trial_spec(self, trial: Trial) -> Spec:
        return apply_params(self.spec, trial.params)

    def status(self, trial: Trial) -> str:
        return trial.status(self.spec.training.epochs, self.driver_alive)

    def full_length(self, trial: Trial) -> bool:
        """Whether ``trial`` trained the whole run a user asked for (``training.epochs``), or ended it itself
        (early stopping): the only trials a winner is chosen from, as BOHB picks its incumbent only among the
        runs of the largest budget. A trial cut at a rung was never measured at the length that is deployed."""
        return trial.epochs >= self.spec.training.epochs - 1e-9 or (
            bool(trial.rows) and trial.rows[-1].get("status") in ("completed", "early_stopped"))

    def ranked(self) -> list[tuple[Trial, dict[str, Any]]]:
        """(trial, its best report), best first: the trials that trained to full length, then (a search that
        ended before any did) the others; trials without a finite metric left out."""
        pairs = [(t, t.best(self.metric, self.mode)) for t in self.trials]
        ranked = rank([p for p in pairs if p[1]], self.metric, self.mode, row=lambda p: p[1])
        return [p for p in ranked if self.full_length(p[0])] + [p for p in ranked if not self.full_length(p[0])]

    def best(self) -> Optional[tuple[Trial, dict[str, Any]]]:
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def best_checkpoint(self) -> Optional[tuple[Trial, Checkpoint]]:
        """The best checkpoint on disk, by the metrics it holds, of a trial that trained to full length
        (of any trial when none did)."""
        pairs = [(t, c) for t in self.trials for c in t.checkpoints()]
        ranked = rank(pairs, self.metric, self.mode, row=lambda p: p[1].metrics)
        full = [p for p in ranked if self.full_length(p[0])]
        return (full or ranked or [None])[0]

    def spec_trial(self) -> Optional[Trial]:
        """The first trial that ran the spec's own values of the searched fields (``include_spec_config``)."""
        own = searched_values(self.spec)
        return next((t for t in self.trials if t.params and all(t.params.get(k) == v for k, v in own.items())), None)

    def trial_epochs(self) -> float:
        """The compute the search has spent: every trial's furthest epoch, summed."""
        return sum(t.epochs for t in self.trials)

    def finalists(self) -> Optional[dict[str, Any]]:
        """What ``finalists.json`` holds, or None when the search scored no finalists."""
        return read_json(self.path / FINALISTS_FILE)


# ---------------------------------------------------------------- reading

def load_search(path: Path | str) -> Search:
    """The search in ``path``, or a UserError saying why it is not one."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"search folder not found: {path}")
    spec = load_search_spec(path)
    trials = {t.trial_id: t for t in (read_trial_folder(p, spec.search.space) for p in trial_folders(path))}
    for state in read_trial_states(path):
        trial = trials.get(state["trial_id"])
        if trial is None:
            folder = path / state["relative_logdir"] if state.get("relative_logdir") else None
            trial = trials.setdefault(state["trial_id"], Trial(state["trial_id"], folder if folder and folder.is_dir()
                                                               else None, state.get("config") or {}))
        trial.ray_status = state.get("status")
        trial.error = state.get("error")
        trial.error_file = Path(state["error_file"]) if state.get("error_file") else None
        trial.params = trial.params or state.get("config") or {}
    return Search(path, spec, sorted(trials.values(), key=trial_order), driver_alive(path))


def load_search_spec(path: Path) -> Spec:
    spec_file = path / SPEC_FILE
    if not spec_file.is_file():
        raise UserError(f"{path} is not a tune-llama search folder (no {SPEC_FILE}; "
                        "create one with tune-llama search SPEC --name NAME)")
    try:
        raw = json.loads(spec_file.read_text())
        raw.pop("_spec_name", None)  # which YAML file it came from: for W&B tags, not part of the schema
        return spec_from_dict(raw)
    except (ValueError, SpecError) as err:
        raise UserError(f"{spec_file}: not a valid search spec ({str(err).splitlines()[0]})") from None


def trial_folders(path: Path) -> list[Path]:
    """Trial folders: Ray writes ``params.json`` into each as the trial starts; one that a kill left with a
    checkpoint but without Ray's files (they reach the search folder in a later sync) counts too, as its
    checkpoint says what it is."""
    found = {p.parent for p in path.glob("*/params.json")}
    found |= {p.parent.parent for p in path.glob(f"*/{checkpoint.FOLDER_GLOB}/{checkpoint.METRICS}")
              if trial_id_from_name(p.parent.parent.name) != p.parent.parent.name}  # a folder Ray named for a trial
    return sorted(found)


def read_trial_folder(folder: Path, space: Iterable[str] = ()) -> Trial:
    """The trial in ``folder``: its params (``params.json``, else what its checkpoint's ``spec.json`` holds of
    the search space ``space``) and one row per report (``result.json``, and each checkpoint's report)."""
    params = read_json(folder / "params.json") or checkpoint_params(folder, space)
    rows = with_checkpoint_reports(read_result_rows(folder / "result.json"), folder)
    trial_id = next((r["trial_id"] for r in rows if r.get("trial_id")), None) or trial_id_from_name(folder.name)
    return Trial(trial_id, folder, params, rows)


def checkpoint_params(folder: Path, space: Iterable[str]) -> dict[str, Any]:
    """The values of the searched fields (``section.field``) in the newest checkpoint's ``spec.json`` that has
    them all: the trial's params when Ray's ``params.json`` never reached the folder; ``{}`` without one."""
    for directory in reversed(checkpoint.folders(folder)):
        spec = read_json(directory / checkpoint.SPEC)
        params = {}
        for key in space:
            with contextlib.suppress(KeyError, AttributeError, TypeError):  # a field this spec.json lacks
                params[key] = field_value(spec, key)
        if params and len(params) == len(list(space)):
            return params
    return {}


def read_result_rows(path: Path) -> list[dict[str, Any]]:
    """Per-report rows of Ray's ``result.json``; a half-written last line (a live search) is skipped.

    A resumed trial may report a step again: the later row wins.
    """
    if not path.is_file():
        return []
    by_report: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_report[row["step"]] = row
    return [by_report[s] for s in sorted(by_report)]


def with_checkpoint_reports(rows: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """``rows`` plus the report of each checkpoint (with weights) that has no row: a search interrupted
    between a checkpoint's copy and Ray's ``result.json`` line still has that report, as its ``metrics.json``
    recorded it. So the summary, the report and export tell one story of what a trial reached: the same
    rows, and a checkpoint counts exactly when its report does."""
    steps = {row["step"] for row in rows}
    for directory in checkpoint.folders(folder):
        metrics = checkpoint.read_metrics(directory) if checkpoint.holds_weights(directory) else None
        if metrics and isinstance(metrics.get("step"), int) and metrics["step"] not in steps:
            rows.append({**metrics, "checkpoint_dir_name": directory.name})
            steps.add(metrics["step"])
    return sorted(rows, key=lambda row: row["step"])


def trial_order(trial: Trial) -> tuple:
    # Ray's folder names carry the trial's sequence number; pending trials go last.
    if trial.path is None:
        return (1, 0, trial.trial_id)
    return (0, trial_sequence_number(trial.path.name), trial.trial_id)
