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
from typing import Any, Optional

from tune_llama.cli import shell_path
from tune_llama.errors import UserError
from tune_llama.paths import read_json
from tune_llama.ray_private import trial_sequence_number
from tune_llama.results import (ERRORED, INTERRUPTED, NO_RESULT, NORMAL_ENDS, PENDING, RUNNING, SAME_ERROR_FILE,
                                SUMMARY_FILE, WAITING, Search, best_row, better, load_search, sort_key)

EXIT_INTERRUPTED, EXIT_ALL_ERRORED = 3, 4
UNFINISHED = (RUNNING, PENDING, WAITING, INTERRUPTED)
"""What ``--resume`` continues: the states that count as unfinished, and the only cause of exit 3 (a trial
that ended without a result is not run again)."""


def summary_lines(search: Search) -> tuple[list[str], dict[str, int]]:
    """What the search came to, as lines, and its trial counts by status."""
    statuses = {t.trial_id: search.status(t) for t in search.trials}
    counts = {s: list(statuses.values()).count(s) for s in set(statuses.values())}
    normal = sum(counts.get(s, 0) for s in NORMAL_ENDS)
    unfinished = sum(counts.get(s, 0) for s in UNFINISHED)
    no_result = counts.get(NO_RESULT, 0)
    lines = [f"search folder: {search.path}",
             f"trials: {len(statuses)} of {search.spec.search.num_samples} ({normal} ended normally, "
             f"{counts.get(ERRORED, 0)} errored, " + (f"{no_result} {NO_RESULT}, " if no_result else "")
             + f"{unfinished} unfinished)"]
    lines += filter(None, [sampler_line(search), warm_start_line(search)])
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
        lines += answer_lines(search)
    for trial in search.trials:
        if statuses[trial.trial_id] == ERRORED:
            lines.append(f"errored trial {trial.trial_id}: {trial.error or 'error'}"
                         + (f"  (full error: {trial.error_file})" if trial.error_file else ""))
    return lines, counts


def answer_lines(search: Search) -> list[str]:
    """The answer a user asks first: the winner against the spec's own config and what the search cost; then
    whether the winner was still improving when it stopped (training longer may pay more than searching)."""
    best = search.best()
    if best is None:
        return []
    trial, row = best
    metric, run_epochs = search.metric, search.spec.training.epochs
    value, spent = row[metric], search.trial_epochs()
    budget = search.spec.search.budget
    cost = f"for {spent:.3g} trial-epochs = {spent / run_epochs:.2g} runs" + (
        f" of a budget of {budget:g}" if budget is not None else "")
    lines = []
    if not search.full_length(trial):
        lines.append(f"note: no trial has trained the full {run_epochs} epochs; this best is from epoch "
                     f"{row['epoch']:g}, shorter than the run you asked for")
    own = search.spec_trial() if search.spec.search.include_spec_config else None
    own_best = own.best(metric, search.mode) if own else None
    if own is trial:
        lines.append(f"best {metric} {value:.4f} is your own config's: no trial beat it, {cost}")
    elif own_best:
        where = "" if search.full_length(own) else f" (stopped at epoch {own.epochs:g})"
        lines.append(f"best {metric} {value:.4f} against your config's {own_best[metric]:.4f}{where} "
                     f"({value / own_best[metric] - 1:+.0%}), {cost}")
    else:
        lines.append(f"best {metric} {value:.4f}, {cost}")
    if still_improving(trial.rows, metric, search.mode):
        lines.append(f"the winner's {metric} was still improving at its last report (epoch {trial.epochs:g}): "
                     "training it longer may pay more than searching more")
    return lines


def still_improving(rows: list[dict], metric: str, mode: str) -> bool:
    """Whether the last report is the best so far and better than the one before it."""
    values = [r.get(metric) for r in rows]
    if len(values) < 2 or not all(isinstance(v, (int, float)) for v in values[-2:]):
        return False
    return best_row(rows, metric, mode) is rows[-1] and sort_key(values[-1], mode) < sort_key(values[-2], mode)


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
    unfinished = sum(counts.get(s, 0) for s in UNFINISHED)
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


# ---------------------------------------------------------------- how each trial's config was drawn; warm start

SAMPLER_FILE = "sampler.json"
"""In the search folder, written as the search starts (``tuner.record_sampler``): how its sampler draws,
``{"sampler": "tpe" or "random", "startup_trials": N (null: every trial random), "given": K}``, where ``given``
counts the configs proposed before the sampler's own (the spec's own, a warm start's, a budget's design)."""
GIVEN, RANDOM, TPE = "given", "random", "tpe"


def drawn(record: Any, index: int) -> Optional[str]:
    """How the ``index``-th trial the search created (0-based) got its config: ``given``, ``random`` (the random
    sampler's, or one of TPE's start-up trials, which the given ones count towards) or ``tpe``; None without a
    record (a search started before it was kept)."""
    if not isinstance(record, dict):
        return None
    if index < record.get("given", 0):
        return GIVEN
    startup = record.get("startup_trials")
    return RANDOM if startup is None or index < startup else TPE


def drawn_by_trial(search: Search) -> dict[str, str]:
    """Trial id -> ``drawn``, for each trial with a folder (whose name holds the order Tune created it in)."""
    record = read_json(search.path / SAMPLER_FILE)
    return {t.trial_id: kind for t in search.trials
            if t.path is not None and (kind := drawn(record, trial_sequence_number(t.path.name) - 1))}


def sampler_line(search: Search) -> Optional[str]:
    """``sampler: TPE after 5 start-up trials (1 given, 4 random); 3 of 8 trials proposed by TPE``, and whether
    the best trial was drawn at random; a search whose trials were all start-up says it was a random search."""
    record = read_json(search.path / SAMPLER_FILE)
    kinds = drawn_by_trial(search)
    if not isinstance(record, dict) or not kinds:
        return None
    if search.spec.search.budget is not None:  # the bracket's configs are all given: the plan proposes them up front
        own = "your own config, then " if search.spec.search.include_spec_config else ""
        return f"configs: {own}a Latin hypercube over the space ({len(kinds)} in all)"
    count = {kind: list(kinds.values()).count(kind) for kind in (GIVEN, RANDOM, TPE)}
    best = search.best()
    lucky = " (the best trial was drawn at random)" if best and kinds.get(best[0].trial_id) == RANDOM else ""
    startup, given = record.get("startup_trials"), record.get("given", 0)
    if startup is None:
        return f"sampler: random (search.sampler), {count[RANDOM]} trials drawn at random, {count[GIVEN]} given"
    head = (f"sampler: TPE after {startup} start-up trials ({min(given, startup)} given, "
            f"{max(startup - given, 0)} random)")
    if count[TPE] == 0:
        return (f"{head}: all {len(kinds)} trials were start-up, so this was a random search; TPE proposes from "
                f"trial {startup + 1} on (--resume DIR --more N adds trials){lucky}")
    return f"{head}; {count[TPE]} of {len(kinds)} trials proposed by TPE{lucky}"


def warm_start_line(search: Search) -> Optional[str]:
    """With ``search.warm_start``: the source's best beside this search's (a warm start can end worse than its
    source, when the rungs cut the source's best config here), and what that config came to here."""
    source = search.spec.search.warm_start
    if not source:
        return None
    try:
        old = load_search(source)
    except UserError:
        return f"warm start: {source} can no longer be read"
    old_best, best = old.best(), search.best()
    if old_best is None or best is None:
        return None
    (old_trial, old_row), (_, row) = old_best, best
    value, old_value = row[search.metric], old_row[old.metric]
    verdict = ("better than" if better(value, old_value, search.mode) else
               "the same as" if value == old_value else "worse than")
    line = (f"warm start: this search's best {search.metric} {value:.4f} is {verdict} its source's, "
            f"{old.name}'s {old.metric} {old_value:.4f} (trial {old_trial.trial_id})")
    here = next((t for t in search.trials if t.params == old_trial.params), None)
    here_best = here.best(search.metric, search.mode) if here else None
    if here_best:
        line += (f"; that config ran here as trial {here.trial_id}: {search.status(here)} at epoch {here.epochs:g}, "
                 f"best {here_best[search.metric]:.4f}")
    return line
