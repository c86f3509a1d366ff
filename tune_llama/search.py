"""Search a spec's hyperparameters: Optuna proposes, successive halving stops poor trials early, Ray keeps
checkpoints.

``tune-llama search SPEC`` (or ``python -m tune_llama.search SPEC``) starts a
search in ``results/NAME``; ``--resume results/NAME`` continues an interrupted
one: searcher and scheduler state come back, unfinished trials continue from
their last checkpoint and errored ones are retried. Everything that can be
checked without Ray (``tune_llama.preflight``) is checked while Ray starts;
bad input shuts that Ray down again and writes nothing.

This module is the command: what a search starts from, start, resume and extend, and the summary at the end
(``tune_llama.summary``). Building the Tuner, and Ray itself, are ``tune_llama.tuner``'s, imported only
when a search gets that far: ``--help`` and bad input do not wait for Ray's import.

Exit codes: 0 every trial ended normally (stops at a rung included), 2 bad input,
3 interrupted (resume it), 4 every trial errored, or ``search.stop_after_same_error``
trials in a row failed the same way and stopped the search; some errored
trials are a warning line with exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from tune_llama.budget import design, plan as budget_plan, read_plan
from tune_llama.cli import add_search_folder_arguments, add_set_argument, shell_path
from tune_llama.driver import DriverLock, new_search_folder, refuse_if_locked
from tune_llama.errors import UserError
from tune_llama.finalists import print_finalists, score_finalists
from tune_llama.progress_bar import say
from tune_llama.paths import read_json
from tune_llama.ray_private import (forget_tune_state, newest_state, older_state, raise_total_samples,
                                    repair_state)
from tune_llama.resources import worker_resources
from tune_llama.results import SAME_ERROR_FILE, SPEC_FILE, SUMMARY_FILE, load_search_spec
from tune_llama.spec import Spec, load_spec, spec_from_dict
from tune_llama.summary import write_summary
from tune_llama.warm_start import first_points


# ---------------------------------------------------------------- what a search starts from

def absolute_paths(spec: Spec) -> Spec:
    """Local paths in a spec, made absolute: Ray runs each trial in its own working directory (and the summary and
    report read the warm start's folder wherever they run)."""
    for section, name in (("data", "source"), ("model", "name"), ("model", "tokenizer"), ("search", "warm_start")):
        value = getattr(getattr(spec, section), name)
        if value and Path(value).expanduser().exists():
            setattr(getattr(spec, section), name, str(Path(value).expanduser().resolve()))
    return spec


def search_dir_for(storage: Optional[Path], name: str) -> Path:
    root = (storage or Path("results")).expanduser().resolve()  # Ray needs absolute storage paths
    return root / name


def resolve_search_dir(args: argparse.Namespace) -> tuple[Optional[Spec], Path]:
    """(spec for a new search or None for a resume, absolute experiment folder) from the arguments."""
    if args.resume is not None:
        if isinstance(args.resume, str):
            search_dir = Path(args.resume).expanduser().resolve()
        elif args.name:
            search_dir = search_dir_for(args.storage, args.name)
        else:
            raise UserError("--resume needs a search folder (--resume results/NAME) or --name NAME")
        if search_dir.is_file():  # --resume specs/x.yaml: the spec a search was started from, not the search
            raise UserError(f"--resume: {args.resume} is a spec file, not a search folder: resume the search with "
                            f"--resume results/NAME (its folder), or start a new one: tune-llama search {args.resume}")
        refuse_changes(search_dir, args.overrides)
        return None, search_dir
    if not args.spec:
        raise UserError("give a spec (e.g. search_spaces/tiny.yaml) or --resume DIR")
    spec = absolute_paths(load_spec(args.spec, args.overrides))
    if not spec.search.space:
        raise UserError(f"search.space: {args.spec} names no field to search")
    name = args.name or f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return spec, search_dir_for(args.storage, name)


def refuse_changes(search_dir: Path, overrides: list[str]) -> None:
    """``--resume`` with a ``--set`` that would change the search is one line: Ray's restore keeps the study's
    space and each trial's config, so it would be ignored. One that repeats the search's own value passes (a
    Slurm job resubmitted with ``--resume`` carries the first submission's arguments)."""
    if not overrides:
        return
    saved = load_search_spec(search_dir).to_dict() if (search_dir / SPEC_FILE).is_file() else None
    for override in overrides:
        try:
            same = saved is not None and spec_from_dict(saved, [override]).to_dict() == saved
        except UserError:
            same = False
        if not same:
            raise UserError(f"--resume cannot change a search (--more neither): --set {override} would be ignored; "
                            f"start a new search with it, from this one's best configs: tune-llama search SPEC "
                            f"--set {override} --set search.warm_start={shell_path(search_dir)}")


def check_resumable(search_dir: Path) -> Spec:
    if not search_dir.is_dir():
        raise UserError(f"--resume: {search_dir} does not exist")
    if never_started(search_dir):
        return load_search_spec(search_dir)
    from tune_llama.tuner import can_restore  # Ray: Tune's own test of its state
    if not (search_dir / SPEC_FILE).is_file() or not can_restore(search_dir):
        raise UserError(f"--resume: {search_dir} is not a tune-llama search folder (no {SPEC_FILE} or Tune state)")
    spec = load_search_spec(search_dir)
    missing = older_state(search_dir)
    if missing:
        raise UserError(f"--resume: this search was started by an older tune-llama (its saved state names {missing}, "
                        f"which this version does not have); resume it with that version, or start a new search "
                        f"with search.warm_start: {shell_path(search_dir)}")
    return spec


# ---------------------------------------------------------------- fresh search / resume / more trials

def say_ray_starts() -> None:
    """The search's first line, before Ray is imported: importing and starting Ray take seconds to tens of
    seconds, and nothing else would show the search is alive meanwhile."""
    say(f"{'joining' if os.environ.get('RAY_ADDRESS') else 'starting'} Ray; meanwhile checking the model "
        "(preflight) ...")


def start(spec: Spec, search_dir: Path, spec_file: str, verbose: bool, lock: Optional[DriverLock] = None):
    """(the folder's lock, the Tuner) of a new search in ``search_dir``, once Ray is up and preflight passed;
    with ``lock``, the folder's (a resume), the search starts again there (``never_started``)."""
    lock_given = lock is not None
    if not lock_given:
        refuse_if_locked(search_dir)
    if not lock_given and (search_dir / SPEC_FILE).exists():
        raise UserError(f"{search_dir} already holds a search: resume it with --resume {shell_path(search_dir)}, "
                        "or pick another --name")
    from tune_llama.preflight import check_inputs, check_storage  # torch: not for --help
    check_storage(search_dir.parent)  # before Ray: a storage that cannot be written leaves no Ray session behind
    inputs = check_inputs(spec, spec_file, search=True)  # paths, data, max_length, the loop's refusals: before Ray
    first, notes = first_points(spec)  # a bad warm_start folder is bad input: before Ray starts
    plan = budget_plan(spec)
    if plan:
        spec.search.num_samples = plan.trials  # what the summary, the table and the scheduler count against
        first = first[:plan.trials]  # the bracket's configs: the spec's own, a warm start's, then a design
        first += design(spec.search.space, plan.trials - len(first), spec.search.seed, given=first)
        for line in plan.lines():  # the plan before anything starts: it takes no Ray
            print(line, file=sys.stderr)
    with new_search_folder(search_dir) if lock is None else contextlib.nullcontext(lock) as lock:  # before Ray
        say_ray_starts()
        from tune_llama.tuner import new_tuner, start_ray
        concurrent = start_ray(spec, verbose, inputs)
    for note in notes:
        print(note, file=sys.stderr)
    if lock_given:  # what a start killed before Tune's first state left (``never_started``)
        forget_tune_state(search_dir)
    (search_dir / SPEC_FILE).write_text(json.dumps({**spec.to_dict(), "_spec_name": Path(spec_file).stem},
                                                   indent=1))
    if plan:
        plan.write(search_dir)
    return lock, new_tuner(spec, search_dir, concurrent, first, verbose, plan)


def never_started(search_dir: Path) -> bool:
    """A search killed after its spec copy was written but before Tune saved its first state: no trial was
    recorded, so ``--resume`` starts it again in its folder from that copy."""
    return (search_dir / SPEC_FILE).is_file() and newest_state(search_dir) is None


def resume(search_dir: Path, verbose: bool, notes: Optional[list[str]] = None):
    """(spec, tuner) that continue the search in ``search_dir``; what the summary should add goes to ``notes``."""
    spec = check_resumable(search_dir)
    say_ray_starts()
    from tune_llama.tuner import restore_study, restored_tuner, start_ray
    concurrent = start_ray(spec, verbose)
    # The study first: the searcher's state is restored into the study in optuna.db.
    rebuilt = restore_study(search_dir, spec)
    if rebuilt:
        print(f"notice: {rebuilt}", file=sys.stderr)
        if notes is not None:
            notes.append(rebuilt)
    repaired = repair_state(search_dir)
    if repaired:
        print(f"notice: {repaired} was cut short (a full disk?); resuming from its last good copy", file=sys.stderr)
    (search_dir / SAME_ERROR_FILE).unlink(missing_ok=True)  # the errored trials are retried
    return spec, restored_tuner(spec, search_dir, concurrent, verbose, read_plan(search_dir))


def check_more(more: int, resuming: bool) -> None:
    if not resuming:
        raise UserError("--more: only with --resume DIR (it extends a search that exists)")
    if more < 1:
        raise UserError(f"--more: must be a positive number of trials, got {more}")


def extend(search_dir: Path, more: int, resuming: bool) -> None:
    """``--resume DIR --more N``: raise the search's ``num_samples`` by N where the spec copy, our scheduler
    and Tune's search generator read it, then resume as usual. Tune keeps ``num_samples`` from the first run
    (``Tuner.restore`` takes no ``TuneConfig``, and the restored generator's count wins over the
    experiment's), so the generator's saved count is raised in place (``ray_private.raise_total_samples``)."""
    check_more(more, resuming)
    spec = check_resumable(search_dir)
    if spec.search.budget is not None:
        raise UserError(f"--more: {search_dir} is sized by search.budget={spec.search.budget:g}; start a new search "
                        f"with a larger budget and search.warm_start: {shell_path(search_dir)}")
    record = json.loads((search_dir / SPEC_FILE).read_text())
    total = spec.search.num_samples + more
    record["search"]["num_samples"] = total
    if not never_started(search_dir):
        raise_total_samples(search_dir, total)
    (search_dir / SPEC_FILE).write_text(json.dumps(record, indent=1))
    print(f"extending {shell_path(search_dir)} by {more} trials to {total}", file=sys.stderr)


def run_tuner(tuner, search_dir: Path) -> None:
    """``tuner.fit()``; a results disk that filled up is one line naming the folder, not Ray's tracebacks."""
    try:
        tuner.fit()
    except Exception:
        if disk_full(search_dir):
            raise OSError(errno.ENOSPC, "No space left on device: the search state is saved up to the last "
                                        "checkpoint that fit; free space, then --resume", str(search_dir)) from None
        raise


def disk_full(path: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", help="YAML spec, e.g. search_spaces/sgd.yaml")
    add_search_folder_arguments(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="resume the search in DIR (or the one --name/--storage point to)")
    parser.add_argument("--more", type=int, metavar="N",
                        help="with --resume: add N trials to the search (same study, scheduler state and folder)")
    parser.add_argument("--print-experiment", action="store_true",
                        help="check the arguments, print the absolute search folder and exit (for job scripts)")
    parser.add_argument("--verbose", action="store_true", help="Ray's own progress output and trial tracebacks")
    add_set_argument(parser)


def main(args: argparse.Namespace) -> int:
    spec, search_dir = resolve_search_dir(args)
    if args.print_experiment:
        if spec is None:
            check_resumable(search_dir)
        print(search_dir)
        return 0
    notes: list[str] = []
    lock: Optional[DriverLock] = None
    if args.more is not None:
        check_more(args.more, resuming=spec is None)
    if spec is None:
        refuse_if_locked(search_dir)  # a second driver: the line that says whose the folder is, first
        check_resumable(search_dir)
        lock = DriverLock(search_dir).take()  # before anything is written, and before Ray starts
    try:
        if args.more is not None:
            extend(search_dir, args.more, resuming=spec is None)
        if spec is None and never_started(search_dir):
            print(f"notice: {search_dir} was stopped before its first trial was recorded; starting it again",
                  file=sys.stderr)
            spec = load_search_spec(search_dir)
            lock, tuner = start(spec, search_dir, read_json(search_dir / SPEC_FILE).get("_spec_name", "spec"),
                                args.verbose, lock)
        elif spec is None:
            spec, tuner = resume(search_dir, args.verbose, notes)
        else:
            lock, tuner = start(spec, search_dir, args.spec, args.verbose)
        run_tuner(tuner, search_dir)
        code = write_summary(search_dir, notes)
        if code == 0 and spec.search.finalists.top_k > 0:
            record = score_finalists(search_dir, worker_resources(spec))
            with (search_dir / SUMMARY_FILE).open("a") as summary:
                with contextlib.redirect_stdout(summary):
                    print_finalists(record)
        return code
    finally:
        if lock is not None:  # the driver holds its folder until its very end
            lock.release()


if __name__ == "__main__":  # python -m tune_llama.search is tune-llama search
    from tune_llama.__main__ import run_command
    run_command("search")
