"""Progress people can read: a compact table for a search, a bar with an ETA for one long run.

A search prints, in place of Ray's own output (``--verbose`` brings that back), a
table every few seconds on a terminal (every 30 s in a log file): one line per
trial with its params, how far it got, its latest and best validation loss and
its status, in 100 columns. ``Progress`` is the bar of a long single run
(``train``, ``evaluate``): a tqdm bar with an ETA on a terminal; elsewhere
(Slurm logs, ``nohup``) a plain line every 30 s and one at the end, since a
redrawn bar is one endless line of carriage returns in a file.

Ray is imported only when a search asks for its table: ``train`` and
``evaluate`` run without it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TextIO

from tune_llama.resources import resources_text, worker_resources
from tune_llama.results import ERRORED, NORMAL_ENDS, PENDING, RUNNING, WAITING, better, ended_state, sort_key
from tune_llama.spec import Spec

WIDTH = 100
TABLE_EVERY_TTY_S = 5.0
PLAIN_EVERY_S = 30.0
MAX_ROWS = 20
LIVE_STATES = (PENDING, RUNNING, WAITING, ERRORED, *NORMAL_ENDS)
"""What a trial's row can say while the search runs: the words of ``results``, as the summary and report."""
"""Trials shown per table: the running ones, then the best; the rest are counted in one line."""


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def terminal_columns(stream: TextIO) -> int:
    """The terminal's width, or 0 when it cannot be told (a pty nobody sized, a stream without a file)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        return 0


# ---------------------------------------------------------------- one long run: a bar or plain lines

def format_duration(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on (tqdm's format)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def eta_seconds(done: int, left: int, elapsed: float) -> Optional[float]:
    """Seconds for ``left`` more units at the average rate of the ``done`` ones; None before the first."""
    if done <= 0:
        return None
    return max(left, 0) * elapsed / done


def plain_line(desc: str, position: int, total: int, unit: str, elapsed: float, done: int,
               final: bool = False) -> str:
    """``desc: 120/400 steps (30%), 02:01 elapsed, ETA 04:42``; at the end ``... in 06:43``.
    ``done`` counts the units of this process only (a resumed run's ETA is not flattered by its start)."""
    percent = f" ({position / total:.0%})" if total > 0 else ""
    head = f"{desc}: {position}/{total} {unit}s{percent}"
    if final:
        return f"{head} in {format_duration(elapsed)}"
    eta = eta_seconds(done, total - position, elapsed)
    return f"{head}, {format_duration(elapsed)} elapsed, ETA {format_duration(eta) if eta is not None else '?'}"


class Progress:
    """``Progress(total, desc, unit)``; ``update(n)`` as work is done, ``close()`` (or ``with``) at the end.

    On a terminal it is a tqdm bar with rate and ETA. Elsewhere it prints ``plain_line`` at most every
    ``every`` seconds (when an update comes) and once more at ``close``. ``write`` prints a line without
    tearing the bar.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0,
                 every: float = PLAIN_EVERY_S, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.position = self.initial = initial
        self.start = self.last_line = clock()
        self.closed = False
        self.bar = None
        if is_tty(self.stream):
            from tqdm.auto import tqdm
            # Follow the terminal's size; where it has none (an unsized pty), tqdm would draw nothing.
            width = {"dynamic_ncols": True} if terminal_columns(self.stream) > 0 else {"ncols": WIDTH, "nrows": 24}
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            mininterval=1.0, **width)

    def update(self, n: int = 1) -> None:
        self.position += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self.last_line >= self.every:
            self._line()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        now = self.clock()
        self.last_line = now
        print(plain_line(self.desc, self.position, self.total, self.unit, now - self.start,
                         self.position - self.initial, final), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def say(line: str, stream: Optional[TextIO] = None) -> None:
    """A line of a search's own progress, timed as the table's titles are."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=stream or sys.stdout, flush=True)


# ---------------------------------------------------------------- between reports: a trial's side channel

LIVE_DIR = ".live"
"""In the search folder: one small JSON per trial (``TRIALID.json``), rewritten every ``training.log_every``
optimizer steps, that the live table reads. Not a Tune report: an extra report would be a row, and an ASHA
rung; not a checkpoint either."""


class StepFile:
    """The loop's ``on_step`` hook of a trial: every ``every`` optimizer steps (and after the first), write
    where the trial is (step within its epoch, the next report's step), its real tokens/s and seconds per
    step since the last write, to ``path``; also at each report step, so the file ends at the trial's last step. Time spent validating and checkpointing is left out of the rates."""

    def __init__(self, path: Path, every: int, clock: Callable[[], float] = time.time):
        self.path, self.every, self.clock = Path(path), every, clock
        self.seconds = self.tokens = self.steps = 0
        self.previous: Optional[tuple[float, int, int]] = None  # (time, tokens seen, reports) at the last step
        self.rate: dict[str, Optional[float]] = {"tokens_per_s": None, "s_per_step": None}
        self.path.unlink(missing_ok=True)  # a retried or resumed trial's old position would read as its new one

    def __call__(self, run) -> None:
        now = self.clock()
        if self.previous is not None and len(run.history) == self.previous[2]:  # no report in between
            self.seconds += now - self.previous[0]
            self.tokens += run.tokens_seen - self.previous[1]
            self.steps += 1
        self.previous = (now, run.tokens_seen, len(run.history))
        if self.path.exists() and run.step % self.every and run.step not in run.report_at:
            return
        if self.seconds > 0:
            self.rate = {"tokens_per_s": self.tokens / self.seconds, "s_per_step": self.seconds / self.steps}
            self.seconds = self.tokens = self.steps = 0
        epoch, in_epoch = divmod(run.step - 1, run.steps_per_epoch)  # the step just taken, 0-based
        write_live(self.path, {
            "step": run.step, "epoch": epoch + 1, "step_in_epoch": in_epoch + 1,
            "steps_per_epoch": run.steps_per_epoch,
            "next_report_step": next((s for s in run.report_at if s >= run.step), None),
            "report_after": next((s for s in run.report_at if s > run.step), None),
            "time": now, **self.rate})


def write_live(path: Path, values: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(values))
    os.replace(partial, path)  # the table never reads half a file


def read_live(path: Path) -> Optional[dict[str, Any]]:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def live_line(live: Optional[dict[str, Any]], last_report_s: Optional[float], now: float,
              reported_step: Optional[int] = None, starting_s: Optional[float] = None) -> str:
    """``epoch 2, step 37/120, 152 tok/s, last report 00:42 ago, next in ~01:20`` for a running trial; before
    its first step, that it is still starting (model, data) and for how long (``starting_s``: since Tune
    started it; a 7B model can take minutes). ``reported_step``: the step of its last report."""
    if live is None:
        return ("starting: loading the model and data"
                + (f", {format_duration(starting_s)} so far" if starting_s is not None else "")
                + (f", last report {format_duration(last_report_s)} ago" if last_report_s is not None else ""))
    parts = [f"epoch {live['epoch']}, step {live['step_in_epoch']}/{live['steps_per_epoch']}"]
    if live.get("tokens_per_s") is not None:
        parts.append(f"{live['tokens_per_s']:.0f} tok/s")
    if last_report_s is not None:
        parts.append(f"last report {format_duration(last_report_s)} ago")
    due = live.get("next_report_step")
    if due == live["step"] and (reported_step is None or reported_step < due):  # written just before validating
        parts.append("validating for the next report")
        return ", ".join(parts)
    if due == live["step"]:  # that report is in: the one after it is next
        due = live.get("report_after")
    if live.get("s_per_step") is not None and due is not None:
        left = (due - live["step"]) * live["s_per_step"] - (now - live["time"])
        parts.append(f"next report in ~{format_duration(max(left, 0.0))}")
    return ", ".join(parts)


# ---------------------------------------------------------------- a search: the trial table

def progress_callbacks(spec: Spec, verbose: bool, search_dir: Optional[Path] = None) -> list:
    return [] if verbose else [progress_table_class()(spec, live_dir=search_dir / LIVE_DIR if search_dir else None)]


def format_value(value: Any, fmt: str = ".3g") -> str:
    """A param or metric in a table cell: floats by ``fmt``, nothing as ``-``."""
    if value is None:
        return "-"
    return format(value, fmt) if isinstance(value, float) else str(value)


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
    params_width = WIDTH - id_width - progress_width - 2 * value_width - status_width - 6
    word_chars = word_chars_that_fit(spec.search.space, params_width)
    params = [shorten(format_params(t["params"], keys, word_chars), params_width) for t in shown]
    values_at = id_width + params_width + progress_width + 3  # the metric's name spans its two columns
    lines = [f"{'':<{values_at}}{metric:^{2 * value_width + 1}}".rstrip(),
             f"{'trial':<{id_width}} {'params':<{params_width}} {'epoch':>{progress_width}} "
             f"{'latest':>{value_width}} {'best':>{value_width}}  status"]
    for t, cell in zip(shown, params):
        progress = f"{t['epoch']:.2f}/{epochs:g}"
        lines.append(f"{t['id'][:id_width]:<{id_width}} {cell:<{params_width}} {progress:>{progress_width}} "
                     f"{format_loss(t['latest']):>{value_width}} {format_loss(t['best']):>{value_width}}  "
                     f"{t['status']}")
        if (details or {}).get(t["id"]):
            lines.append(f"{'':<{id_width}} └ {details[t['id']]}")
    shown_ids = {t["id"] for t in shown}
    hidden = [t for t in trials if t["id"] not in shown_ids]
    if hidden:
        lines.append(f"... {len(hidden)} more: {status_counts(hidden)}")
    return "\n".join(line[:WIDTH] for line in lines)


class TrialTable:
    """The table's state, kept from Ray Tune's callback events (``ProgressTable`` is it as a Ray Callback)."""

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

    def _entry(self, trial) -> dict[str, Any]:
        return self.trials.setdefault(trial.trial_id, {"id": trial.trial_id, "params": dict(trial.config),
                                                       "epoch": 0.0, "latest": None, "best": None,
                                                       "last": {}, "status": PENDING, "reported_at": None,
                                                       "started_at": None})

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
        title = (f"[{time.strftime('%H:%M:%S')}] {len(self.trials)} of {self.spec.search.num_samples} trials: "
                 f"{status_counts(self.trials.values())}{pending}")
        print(f"\n{title[:WIDTH]}\n" + table(self.spec, list(self.trials.values()), self.details()),
              file=self.stream or sys.stdout, flush=True)


def progress_table_class() -> type:
    """``TrialTable`` as a Ray Tune Callback, made on first use so that importing this module does not
    import Ray; it is the module's ``ProgressTable`` (found by name, so it pickles)."""
    if "ProgressTable" not in globals():
        from ray.tune import Callback
        globals()["ProgressTable"] = type("ProgressTable", (TrialTable, Callback),
                                          {"__module__": __name__, "__doc__": TrialTable.__doc__})
    return globals()["ProgressTable"]


def __getattr__(name: str):
    if name == "ProgressTable":
        return progress_table_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
