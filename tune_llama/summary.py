"""What a search came to, printed when it ends and kept in ``summary.txt``: its trials by status, the best
trial and checkpoint, each errored trial's error, the commands that make sense next, and the exit code.

Exit codes: 0 every trial ended normally (stops at a rung included), 3 interrupted (resume it), 4 every
trial errored, or ``search.stop_after_same_error`` trials in a row failed the same way and stopped the
search; some errored trials are a warning line with exit 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from tune_llama.cli import shell_path
from tune_llama.results import (ERRORED, INTERRUPTED, NORMAL_ENDS, PENDING, RUNNING, SAME_ERROR_FILE, SUMMARY_FILE,
                                Search, load_search)

EXIT_INTERRUPTED, EXIT_ALL_ERRORED = 3, 4


def summary_lines(search: Search) -> tuple[list[str], dict[str, int]]:
    """What the search came to, as lines, and its trial counts by status."""
    statuses = {t.trial_id: search.status(t) for t in search.trials}
    counts = {s: list(statuses.values()).count(s) for s in set(statuses.values())}
    normal = sum(counts.get(s, 0) for s in NORMAL_ENDS)
    unfinished = sum(counts.get(s, 0) for s in (RUNNING, PENDING, INTERRUPTED))
    lines = [f"search folder: {search.path}",
             f"trials: {len(statuses)} of {search.spec.search.num_samples} ({normal} ended normally, "
             f"{counts.get(ERRORED, 0)} errored, {unfinished} unfinished)"]
    best = search.best()
    if best is None:
        lines.append(f"no trial reported a finite {search.metric} yet")
    else:
        trial, row = best
        lines += [f"best trial: {trial.trial_id}  ({trial.path.name if trial.path else 'no folder'})",
                  f"  params: {json.dumps(trial.params)}",
                  f"  best report: {row['report']} (epoch {row['epoch']:g}, step {row['step']})  "
                  f"{search.metric}: {row[search.metric]:.4f}  eval_perplexity: {row['eval_perplexity']:.3f}"]
        checkpoint = search.best_checkpoint()
        if checkpoint:
            lines.append(f"  checkpoint: {checkpoint[1].path}")
    for trial in search.trials:
        if statuses[trial.trial_id] == ERRORED:
            lines.append(f"errored trial {trial.trial_id}: {trial.error or 'error'}"
                         + (f"  (full error: {trial.error_file})" if trial.error_file else ""))
    return lines, counts


def next_commands(search: Search, where: str, interrupted: bool, errored: int) -> list[str]:
    """The commands that make sense in the search's state: export only with a checkpoint to export, resume
    only when there is something left to run (unfinished trials, or errored ones a resume retries)."""
    lines = [f"  report:   tune-llama report {where}"]
    if search.best_checkpoint() is not None:
        lines.append(f"  export:   tune-llama export {where}")
    if interrupted or errored:
        why = "continue the unfinished trials" if interrupted else f"retry the {errored} errored trials"
        lines.append(f"  resume:   tune-llama search --resume {where}   ({why})")
    return lines


def write_summary(search_dir: Path, notes: Optional[list[str]] = None) -> int:
    """Print what the search came to and the commands that follow (also into summary.txt); the exit code.
    ``notes``: lines about this run of the search (a rebuilt study), after the counts."""
    search = load_search(search_dir)
    search.driver_alive = False  # this process is the driver, and its search is over
    lines, counts = summary_lines(search)
    lines[2:2] = notes or []
    where = shell_path(search_dir)
    errored = counts.get(ERRORED, 0)
    unfinished = len(search.trials) - errored - sum(counts.get(s, 0) for s in NORMAL_ENDS)
    interrupted = bool(unfinished or len(search.trials) < search.spec.search.num_samples)
    lines += ["next:", *next_commands(search, where, interrupted, errored)]
    text = "\n".join(lines)
    print("\n" + text)
    (search_dir / SUMMARY_FILE).write_text(text + "\n")
    same_error = search_dir / SAME_ERROR_FILE
    if same_error.is_file():
        print(f"error: {same_error.read_text().strip()}", file=sys.stderr)
        return EXIT_ALL_ERRORED
    if search.trials and errored == len(search.trials):
        print(f"error: every trial errored ({errored}); the first lines are above, full errors in each "
              f"trial's error.txt", file=sys.stderr)
        return EXIT_ALL_ERRORED
    if interrupted:
        print(f"the search was interrupted: continue it with tune-llama search --resume {where}")
        return EXIT_INTERRUPTED
    if errored:
        print(f"warning: {errored} of {len(search.trials)} trials errored (see above)", file=sys.stderr)
    return 0
