"""Between a trial's reports: where it is, in a small file the search's table reads (the side channel).

A trial reports to Tune a few times an epoch; an epoch can take many minutes. ``StepFile`` (the loop's
``on_step`` hook in a trial) rewrites one JSON per trial with its step and real rates; ``live_line`` is what
the table prints under a running trial from it. Imports nothing of Ray: the trial's process writes it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tune_llama.paths import read_json
from tune_llama.progress_bar import format_duration

LIVE_DIR = ".live"
"""In the search folder: one small JSON per trial (``TRIALID.json``), rewritten every ``training.log_every``
optimizer steps, that the live table reads. Not a Tune report: an extra report would be a row, and an ASHA
rung; not a checkpoint either."""


class StepFile:
    """The loop's ``on_step`` hook of a trial: every ``every`` optimizer steps (and after the first), write
    where the trial is (step within its epoch, the next report's step), its real tokens/s and seconds per
    step since the last write, to ``path``; also at each report step, so the file ends at the trial's last
    step. Time spent validating and checkpointing is left out of the rates."""

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
    values = read_json(Path(path))
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

