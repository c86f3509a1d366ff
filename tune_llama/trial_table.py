"""A search's trial table, printed in place of Ray's own output (``--verbose`` brings that back): every few
seconds on a terminal (every 30 s in a log file), one line per trial with its params, how far it got, its
latest and best validation loss and its status, in 100 columns, and under a running trial where it is
between reports (``tune_llama.live``).

``TrialTable`` is a Ray Tune callback: this module imports Ray, and only the search side imports it.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

from ray.tune import Callback

from tune_llama.live import LIVE_DIR, live_line, read_live
from tune_llama.progress_bar import PLAIN_EVERY_S, WIDTH, format_value, is_tty, say
from tune_llama.resources import resources_text, worker_resources
from tune_llama.paths import read_json
from tune_llama.results import (ERRORED, NO_RESULT, NORMAL_ENDS, PENDING, RUNNING, WAITING, better, ended_state,
                                sort_key)
from tune_llama.spec import Spec
from tune_llama.summary import RANDOM, SAMPLER_FILE, drawn

TABLE_EVERY_TTY_S = 5.0
MAX_ROWS = 20
"""Trials shown per table: the running ones, then the best; the rest are counted in one line."""
LIVE_STATES = (PENDING, RUNNING, WAITING, ERRORED, *NORMAL_ENDS)
"""What a trial's row can say while the search runs: the words of ``results``, as the summary and report."""
RANDOM_MARK = "*"
"""Beside the id of a trial whose config was drawn at random (one of TPE's start-up trials), explained under
the table: a column of its own (ids stay the first word of a row), two characters of the params column's."""


def short_name(key: str, word_chars: Optional[int] = None) -> str:
    """A param's last name with each of its words cut to ``word_chars``: one rule for every key, so
    ``gradient_accumulation_steps`` reads ``grad_accu_step`` beside ``opti`` and ``lr`` at 4."""
    return "_".join(word[:word_chars] for word in key.split(".")[-1].split("_"))


def format_params(params: dict[str, Any], keys: list[str], word_chars: Optional[int] = None) -> str:
    """``lr=0.00229 optimizer=sgd``: each searched param by its short name (``short_name``)."""
    return " ".join(f"{short_name(key, word_chars)}={format_value(params.get(key))}" for key in keys)


def value_width(dist: dict[str, list]) -> int:
    """The widest a sampled value of a search-space distribution prints as."""
    (kind, args), = dist.items()
    if kind == "choice":
        return max(len(format_value(choice)) for choice in args)
    if kind == "int":
        return max(len(str(int(bound))) for bound in args)
    return 8 + (min(args[:2]) < 0)  # a float in 3 digits: 0.000123, 1.23e-05, 1.23e+04; a sign


def word_chars_that_fit(space: dict[str, dict[str, list]], width: int) -> int:
    """How many characters of each word of a param's name the params column has room for, whatever values
    the trials draw (the same for every refresh, so the column does not change shape as trials come)."""
    values = sum(value_width(dist) + 2 for dist in space.values()) - 1  # "=" and a space each, less one
    longest = max((len(word) for key in space for word in short_name(key).split("_")), default=0)
    for word_chars in range(longest, 2, -1):
        if values + sum(len(short_name(key, word_chars)) for key in space) <= width:
            return word_chars
    return 3


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def shown_trials(trials: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """At most ``MAX_ROWS`` trials: the running ones first, then the rest best first."""
    if len(trials) <= MAX_ROWS:
        return trials
    finite = lambda t: isinstance(t["best"], (int, float)) and math.isfinite(t["best"])  # noqa: E731
    rest = sorted((t for t in trials if t["status"] != RUNNING),
                  key=lambda t: (not finite(t), sort_key(t["best"], mode) if finite(t) else 0.0))
    return ([t for t in trials if t["status"] == RUNNING] + rest)[:MAX_ROWS]


def status_counts(trials: Iterable[dict[str, Any]]) -> str:
    """``4 finished, 2 stopped at rung``."""
    return ", ".join(f"{n} {status}" for status, n in sorted(Counter(t["status"] for t in trials).items()))


def table(spec: Spec, trials: list[dict[str, Any]], details: Optional[dict[str, str]] = None) -> str:
    """The lines to print for ``trials`` (dicts with id, params, epoch, latest, best, status), each at most
    ``WIDTH`` characters, with a trial's line of ``details`` (where it is between reports) under it; past
    ``MAX_ROWS`` trials, a last line counts the ones not shown by status."""
    keys = list(spec.search.space)
    shown = shown_trials(trials, spec.search.mode)
    epochs, metric = spec.training.epochs, spec.search.metric
    id_width = min(max([5, *(len(t["id"]) for t in shown)]), 14)  # Ray's ids: 8 hex digits, or 8 + _NNNNN
    progress_width = max(len("epoch"), len(f"{epochs:.2f}/{epochs:g}"))
    value_width = 8
    status_width = max(len(state) for state in LIVE_STATES)
    # Random trials are the first ones: once there is one, the columns keep their shape.
    marks = {t["id"]: RANDOM_MARK if t.get("drawn") == RANDOM else "" for t in trials}
    mark_width = 2 if any(marks.values()) else 0
    params_width = WIDTH - id_width - mark_width - progress_width - 2 * value_width - status_width - 6
    word_chars = word_chars_that_fit(spec.search.space, params_width)
    params = [shorten(format_params(t["params"], keys, word_chars), params_width) for t in shown]
    values_at = id_width + mark_width + params_width + progress_width + 3  # the metric's name spans two columns
    lines = [f"{'':<{values_at}}{metric:^{2 * value_width + 1}}".rstrip(),
             f"{'trial':<{id_width + mark_width}} {'params':<{params_width}} {'epoch':>{progress_width}} "
             f"{'latest':>{value_width}} {'best':>{value_width}}  status"]
    for t, cell in zip(shown, params):
        progress = f"{t['epoch']:.2f}/{epochs:g}"
        lines.append(f"{t['id'][:id_width]:<{id_width}} {marks[t['id']]:<{mark_width}}{cell:<{params_width}} "
                     f"{progress:>{progress_width}} "
                     f"{format_loss(t['latest']):>{value_width}} {format_loss(t['best']):>{value_width}}  "
                     f"{t['status']}")
        if (details or {}).get(t["id"]):
            lines.append(f"{'':<{id_width}} └ {details[t['id']]}")
    shown_ids = {t["id"] for t in shown}
    hidden = [t for t in trials if t["id"] not in shown_ids]
    if hidden:
        lines.append(f"... {len(hidden)} more: {status_counts(hidden)}")
    if any(t.get("drawn") == RANDOM for t in shown):
        lines.append(f"{RANDOM_MARK} drawn at random" + ("" if spec.search.sampler == "random" else
                                                         ": one of TPE's start-up trials, before it models the results"))
    return "\n".join(line[:WIDTH] for line in lines)


class TrialTable(Callback):
    """The table's state, kept from Ray Tune's callback events, printed every ``every`` seconds."""

    def __init__(self, spec: Spec, stream: Optional[TextIO] = None, live_dir: Optional[Path] = None):
        self.spec = spec
        self.metric, self.mode = spec.search.metric, spec.search.mode
        self.trials: dict[str, dict[str, Any]] = {}
        self.stream = stream
        self.live_dir = live_dir
        self.every = TABLE_EVERY_TTY_S if is_tty(stream or sys.stdout) else PLAIN_EVERY_S
        self.last_print = 0.0
        self.waiting = ""  # the last "waiting for ..." line printed before the first trial started
        self.pending = 0  # trials Tune holds back, not yet started (they have no row)
        self.total: Optional[int] = None  # the search's trials, as Tune counts them (after --more too)
        self.order: dict[str, int] = {}  # trial id -> its place in the order Tune created the trials, from 0

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total = total_num_samples  # a resumed search's, raised by --more: the spec its callbacks got may not be

    def _entry(self, trial) -> dict[str, Any]:
        if trial.trial_id not in self.trials:
            self.trials[trial.trial_id] = self._known(trial)
        return self.trials[trial.trial_id]

    def _known(self, trial) -> dict[str, Any]:
        """A new row, from what Tune already holds of the trial: in a resumed search, how an ended trial ended
        and the last report of one that goes on (its best value too), not an empty row."""
        last = reported(getattr(trial, "last_result", None))
        best = (getattr(trial, "metric_analysis", None) or {}).get(self.metric, {}).get(self.mode)
        latest = last.get(self.metric)
        status = {"RUNNING": RUNNING, "PAUSED": WAITING, "ERROR": ERRORED}.get(getattr(trial, "status", None), PENDING)
        if getattr(trial, "status", None) == "TERMINATED":
            status = ended_state(last, self.spec.training.epochs) if last else NO_RESULT
        return {"id": trial.trial_id, "params": dict(trial.config), "epoch": float(last.get("epoch", 0.0)),
                "latest": latest, "best": best if better(best, None, self.mode) else latest, "last": last,
                "status": status, "reported_at": None, "started_at": None}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._entry(trial).update(status=RUNNING, started_at=time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        entry = self._entry(trial)
        value = result.get(self.metric)
        entry.update(epoch=float(result.get("epoch", 0.0)), latest=value, last=result, status=RUNNING,
                     reported_at=time.time())
        if better(value, entry["best"], self.mode):
            entry["best"] = value

    def on_trial_complete(self, iteration, trials, trial, **info):
        entry = self._entry(trial)
        entry["status"] = ended_state(entry["last"], self.spec.training.epochs)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._entry(trial)["status"] = ERRORED

    def on_step_end(self, iteration, trials, **info):
        self.pending = sum(t.status == "PENDING" for t in trials)
        self.order.update((t.trial_id, n - 1) for t in trials if (n := creation_number(t)))
        for trial in trials:  # a resumed search's trials, ended or going on: Tune sends their past no event
            if trial.status != "PENDING" or reported(getattr(trial, "last_result", None)):
                self._entry(trial)
        for trial in trials if self.trials else []:  # the halving scheduler pauses a trial at a rung
            entry = self.trials.get(trial.trial_id)
            if entry and trial.status == "PAUSED" and entry["status"] == RUNNING:
                entry["status"] = WAITING
            elif entry and trial.status == "RUNNING" and entry["status"] == WAITING:
                entry["status"] = RUNNING
        if not self.trials:
            self.say_waiting(self.pending)
        elif time.monotonic() - self.last_print >= self.every:
            self.print()

    def say_waiting(self, pending: int) -> None:
        """Before the first trial starts: what the search waits for, each time that changes."""
        # Tune says PENDING both while it waits for free resources and while Ray starts the trial's process.
        line = (f"{pending} trial{'s' * (pending != 1)} pending, each asking for "
                f"{resources_text(worker_resources(self.spec))}: waiting for free resources and worker processes"
                if pending else "waiting for the searcher's first trial")
        if line != self.waiting:
            self.waiting = line
            say(line, self.stream)

    def details(self) -> dict[str, str]:
        """Each running trial's place between reports, from its side-channel file (``StepFile``)."""
        if self.live_dir is None:
            return {}
        now = time.time()
        return {t["id"]: live_line(read_live(self.live_dir / f"{t['id']}.json"),
                                   now - t["reported_at"] if t["reported_at"] else None, now, t["last"].get("step"),
                                   now - t["started_at"] if t["started_at"] else None)
                for t in self.trials.values() if t["status"] == RUNNING}

    def on_experiment_end(self, trials, **info):
        self.print()

    def print(self) -> None:
        self.last_print = time.monotonic()
        if not self.trials:
            return
        waiting = [t for t in self.trials.values() if t["status"] == PENDING]
        pending = f"; {self.pending - len(waiting)} more pending" if self.pending > len(waiting) else ""
        record = read_json(self.live_dir.parent / SAMPLER_FILE) if self.live_dir else None
        for trial_id, entry in self.trials.items():
            entry["drawn"] = drawn(record, self.order[trial_id]) if trial_id in self.order else None
        total = self.total or self.spec.search.num_samples
        title = (f"[{time.strftime('%H:%M:%S')}] {len(self.trials)} of {max(total, len(self.trials))} trials: "
                 f"{status_counts(self.trials.values())}{pending}")
        rows = sorted(self.trials.values(), key=lambda t: self.order.get(t["id"], len(self.order)))
        print(f"\n{title[:WIDTH]}\n" + table(self.spec, rows, self.details()), file=self.stream or sys.stdout,
              flush=True)


def creation_number(trial) -> Optional[int]:
    """The trial's number in the order Tune created the trials, from 1: what its experiment tag starts with
    (``3_training.lr=...``; its folder name carries the same, ``ray_private.trial_sequence_number``). A
    restored search lists its trials in another order."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else None


def reported(result: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A Tune result that is one of the trial's reports (it has an ``epoch``), else {}: before its first report
    Tune fills a trial's last result with its own bookkeeping."""
    return dict(result) if isinstance(result, dict) and "epoch" in result else {}


def progress_callbacks(spec: Spec, verbose: bool, search_dir: Optional[Path] = None) -> list:
    """The table as the search's Tune callback; none with ``--verbose`` (Ray's own output instead)."""
    return [] if verbose else [TrialTable(spec, live_dir=search_dir / LIVE_DIR if search_dir else None)]
