"""Search a spec's hyperparameters: Optuna proposes, successive halving stops poor trials early, Ray keeps
checkpoints.

``tune-llama search SPEC`` (or ``python -m tune_llama.search SPEC``) starts a
search in ``results/NAME``; ``--resume results/NAME`` continues an interrupted
one: searcher and scheduler state come back, unfinished trials continue from
their last checkpoint and errored ones are retried. Everything that can be
checked without Ray (``tune_llama.preflight``) is checked while Ray starts;
bad input shuts that Ray down again and writes nothing.

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
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from tune_llama.cli import add_search_folder_arguments, add_set_argument, shell_path
from tune_llama.errors import UserError
from tune_llama.results import (ERRORED, INTERRUPTED, NORMAL_ENDS, OPTUNA_DB, PENDING, RUNNING, SAME_ERROR_FILE,
                                SPEC_FILE, SUMMARY_FILE, Search, load_search, load_search_spec, write_driver_file)
from tune_llama.spec import Spec, load_spec, spec_from_dict

EXIT_INTERRUPTED, EXIT_ALL_ERRORED = 3, 4


# ---------------------------------------------------------------- building blocks

def param_space(spec: Spec) -> dict[str, Any]:
    """The spec's YAML space as Tune distributions (validated by the schema already)."""
    from ray import tune
    kinds = {
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "int": lambda a: tune.randint(int(a[0]), int(a[1]) + 1),  # inclusive, as the spec documents
        "quniform": lambda a: tune.quniform(a[0], a[1], a[2]),
        "choice": lambda a: tune.choice(list(a)),
    }
    space = {}
    for key, dist in spec.search.space.items():
        (kind, args), = dist.items()
        space[key] = kinds[kind](args)
    return space


def trainable(spec: Spec, search_dir: Optional[Path] = None):
    """The trial function with the spec bound; with ``experiment``, trials tell the live table where they are."""
    from ray import tune
    from tune_llama.progress import LIVE_DIR
    from tune_llama.resources import tune_trial_resources
    from tune_llama.trainable import train_trial
    return tune.with_resources(tune.with_parameters(train_trial, spec=spec.to_dict(),
                                                    live_dir=str(search_dir / LIVE_DIR) if search_dir else None),
                               tune_trial_resources(spec))


def grace_period(spec: Spec) -> float:
    """ASHA's grace period in epochs: the spec's, else the first report."""
    t = spec.training
    if spec.search.asha.grace_period is not None:
        return spec.search.asha.grace_period
    return t.eval_every if t.eval_every <= 1 else 1.0


def sampler(spec: Spec):
    """The Optuna sampler ``search.sampler`` names, seeded with ``search.seed``.

    TPE for trials that run at once: ``constant_liar`` counts running trials as poor so that concurrent
    proposals spread out instead of piling onto the same point; ``multivariate`` models lr and optimizer
    together (the good lr depends on the optimizer); random start-up trials in proportion to the search
    (a quarter of it, 5 to 10), so a 16-trial search is not spent mostly at random.
    """
    import optuna
    s = spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s.seed, constant_liar=True, multivariate=True,
                                          n_startup_trials=min(10, max(5, s.num_samples // 4)))


def tune_config(spec: Spec, search_dir: Path, concurrent: int, first: Optional[list[dict[str, Any]]] = None):
    """Optuna (in SQLite), the scheduler ``search.scheduler`` names on the fractional epoch, and at most
    ``concurrent`` trials at once (trials paused at a rung not counted); ``first``: configs Optuna proposes
    before its own (``warm_start``)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from tune_llama.scheduler import HalvingScheduler, WaitingLimiter
    from tune_llama.searcher import ResumableOptunaSearch
    from tune_llama.study import storage_url

    s = spec.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url(search_dir))
    searcher = ResumableOptunaSearch(sampler=sampler(spec), storage=storage, study_name=search_dir.name,
                                     points_to_evaluate=first or None)
    limiter = WaitingLimiter(searcher, max_concurrent=concurrent)
    # The time unit is the fractional epoch each report carries: reports inside an epoch are the rungs.
    rungs = dict(time_attr="epoch", max_t=spec.training.epochs, grace_period=grace_period(spec),
                 reduction_factor=s.asha.reduction_factor)
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(**rungs, brackets=s.asha.brackets)
    else:
        scheduler = HalvingScheduler(search_dir, limiter, **rungs)
    # A new trial reuses an ended trial's process: no interpreter, torch import or CUDA context to start again
    # (seconds per trial, most of a short trial's overhead). Ray Train trials keep their own worker groups.
    return tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
                           search_alg=limiter, reuse_actors=s.resources.workers == 1)


def run_config(spec: Spec, search_dir: Path, verbose: bool):
    from ray import tune
    from tune_llama.progress import progress_callbacks
    from tune_llama.ray_private import result_loggers
    from tune_llama.searcher import ForgetLostCheckpoints, SameErrorStop, StateBackup, worker_callbacks
    from tune_llama.tracking import callbacks

    s = spec.search
    same_error = SameErrorStop(str(search_dir), s.stop_after_same_error)
    return tune.RunConfig(
        name=search_dir.name,
        storage_path=str(search_dir.parent),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints, checkpoint_score_attribute=s.metric,
                                                checkpoint_score_order=s.mode),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        stop=same_error.stopper,
        callbacks=[StateBackup(str(search_dir)), ForgetLostCheckpoints(), same_error,
                   *callbacks(spec, search_dir.name, spec_name=spec_name(search_dir)),
                   *progress_callbacks(spec, verbose, search_dir), *worker_callbacks(spec), *result_loggers()],
        verbose=None if verbose else 0,
    )


def spec_name(search_dir: Path) -> Optional[str]:
    info = (search_dir / SPEC_FILE)
    try:
        return json.loads(info.read_text()).get("_spec_name")
    except (OSError, ValueError, AttributeError):
        return None


def init_ray(spec: Spec, verbose: bool) -> None:
    """Join the cluster in $RAY_ADDRESS (Slurm, multi-node), else start a local Ray of our own."""
    import ray
    if ray.is_initialized():
        return
    # One line per failed trial (its error file keeps the traceback), not a traceback per retry; and
    # our progress table instead of Ray's (the legacy reporter is the one verbose=0 silences).
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "1" if verbose else "0")
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # A trial's error whose result Tune never collected (the search stopped first) would print its whole
        # stack at exit; each trial's error.txt keeps it.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    address = os.environ.get("RAY_ADDRESS")
    # "local": a Ray of our own even where another user's `ray start` registered a cluster in /tmp/ray.
    # A reused process waits for the stopped trial's thread to end (its finally frees the model) before the
    # next trial starts there; Tune's default 2 s, missed, would error the next trial instead.
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=verbose,
             configure_logging=True, logging_level="INFO" if verbose else "ERROR",
             runtime_env={"env_vars": {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "120"}})


def forward_sigterm_to_tune() -> None:
    """Slurm sends SIGTERM before a wall-time kill; Tune stops gracefully (state saved) on SIGUSR1.

    Installed after ``ray.init``, which replaces any earlier SIGTERM handler with one that aborts.
    """
    def handler(signum, frame):
        print("SIGTERM: saving the search state; resume it with --resume", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------- fresh search / resume

def absolute_paths(spec: Spec) -> Spec:
    """Local paths in a spec, made absolute: Ray runs each trial in its own working directory."""
    for section, name in (("data", "source"), ("model", "name"), ("model", "tokenizer")):
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
            raise UserError(f"--resume cannot change a search: --set {override} would be ignored "
                            "(start a new search with it, or add trials with --more N)")


def check_resumable(search_dir: Path) -> Spec:
    from ray import tune
    if not search_dir.is_dir():
        raise UserError(f"--resume: {search_dir} does not exist")
    if not (search_dir / SPEC_FILE).is_file() or not tune.Tuner.can_restore(str(search_dir)):
        raise UserError(f"--resume: {search_dir} is not a tune-llama search folder (no {SPEC_FILE} or Tune state)")
    return load_search_spec(search_dir)


def start(spec: Spec, search_dir: Path, spec_file: str, verbose: bool):
    from ray import tune
    from tune_llama.preflight import check_storage
    if (search_dir / SPEC_FILE).exists():
        raise UserError(f"{search_dir} already holds a search: resume it with --resume {shell_path(search_dir)}, "
                        "or pick another --name")
    check_storage(search_dir.parent)  # before Ray: a storage that cannot be written leaves no Ray session behind
    from tune_llama.warm_start import warm_start_points
    first, notes = warm_start_points(spec)  # a bad warm_start folder is bad input: before Ray starts
    concurrent = start_ray(spec, verbose)  # before the folder exists: a refused search leaves nothing behind
    for note in notes:
        print(note, file=sys.stderr)
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / SPEC_FILE).write_text(json.dumps({**spec.to_dict(), "_spec_name": Path(spec_file).stem},
                                                   indent=1))
    write_driver_file(search_dir)
    return tune.Tuner(trainable(spec, search_dir), param_space=param_space(spec),
                      tune_config=tune_config(spec, search_dir, concurrent, first),
                      run_config=run_config(spec, search_dir, verbose))


def resume(search_dir: Path, verbose: bool, notes: Optional[list[str]] = None):
    """(spec, tuner) that continue the search in ``experiment``; what the summary should add goes to ``notes``."""
    from ray import tune
    from tune_llama.ray_private import repair_state
    spec = check_resumable(search_dir)
    start_ray(spec, verbose)
    # The study first: repair_state unpickles the searcher's state, whose Optuna storage opens optuna.db (and
    # creates an empty one where it is missing). Before the driver file: the old driver's trials are unfinished.
    rebuilt = restore_study(search_dir, spec)
    if rebuilt:
        print(f"notice: {rebuilt}", file=sys.stderr)
        if notes is not None:
            notes.append(rebuilt)
    repaired = repair_state(search_dir)
    if repaired:
        print(f"notice: {repaired} was cut short (a full disk?); resuming from its last good copy", file=sys.stderr)
    (search_dir / SAME_ERROR_FILE).unlink(missing_ok=True)  # the errored trials are retried
    write_driver_file(search_dir)
    return spec, tune.Tuner.restore(str(search_dir), trainable(spec, search_dir), resume_unfinished=True, resume_errored=True,
                                    param_space=param_space(spec))


def restore_study(search_dir: Path, spec: Spec) -> Optional[str]:
    """Rebuild ``optuna.db`` from the trial folders when it cannot be read or is missing (``tune_llama.study``);
    a line saying so, or None when the study was fine. Before ``Tuner.restore``: it unpickles the searcher,
    whose storage opens the database."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    from tune_llama.study import DAMAGED_SUFFIX, move_aside, rebuild_study, study_readable
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our notice says it; not Optuna's "new study" lines
    if study_readable(search_dir):
        return None
    why = f"could not be read (moved to {OPTUNA_DB}{DAMAGED_SUFFIX})" if move_aside(search_dir) else "was missing"
    restored = rebuild_study(load_search(search_dir), OptunaSearch.convert_search_space(param_space(spec)))
    return f"study: {OPTUNA_DB} {why}; rebuilt from the trial folders, {restored} trials restored"


def extend(search_dir: Path, more: int, resuming: bool) -> None:
    """``--resume DIR --more N``: raise the search's ``num_samples`` by N where the spec copy, our scheduler
    and Tune's search generator read it, then resume as usual. Tune keeps ``num_samples`` from the first run
    (``Tuner.restore`` takes no ``TuneConfig``, and the restored generator's count wins over the
    experiment's), so the generator's saved count is raised in place (``ray_private.raise_total_samples``)."""
    from tune_llama.ray_private import raise_total_samples
    if not resuming:
        raise UserError("--more: only with --resume DIR (it extends a search that exists)")
    if more < 1:
        raise UserError(f"--more: must be a positive number of trials, got {more}")
    spec = check_resumable(search_dir)
    record = json.loads((search_dir / SPEC_FILE).read_text())
    total = spec.search.num_samples + more
    record["search"]["num_samples"] = total
    raise_total_samples(search_dir, total)
    (search_dir / SPEC_FILE).write_text(json.dumps(record, indent=1))
    print(f"extending {shell_path(search_dir)} by {more} trials to {total}", file=sys.stderr)


def start_ray(spec: Spec, verbose: bool) -> int:
    """Run ``preflight(spec)`` in a thread while Ray starts (or is joined) in this one; return how many trials
    may run at once on it (``preflight.check_cluster``: one line if a trial cannot run there).

    Both take seconds, and Ray's start is mostly waiting for its processes. Ray must start in the main thread:
    it sets a signal handler, and the processes it spawns die with the thread that spawned them. When
    preflight refuses the input, the Ray started here is shut down again, so bad input leaves no Ray behind.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tune_llama.progress import say
    # Importing Ray and starting it take seconds to tens of seconds: say so before either begins.
    say(f"{'joining' if os.environ.get('RAY_ADDRESS') else 'starting'} Ray; meanwhile checking the spec, data and "
        "model (preflight) ...")
    import ray
    from tune_llama.preflight import check_cluster, preflight
    started_here = not ray.is_initialized()
    with ThreadPoolExecutor(1, thread_name_prefix="preflight") as pool:
        checked = pool.submit(preflight, spec)
        try:
            init_ray(spec, verbose)
        except BaseException:
            if checked.exception() is not None:  # bad input explains more than Ray's failure to start
                raise checked.exception() from None
            raise
    if checked.exception() is not None:
        if started_here:
            ray.shutdown()
        raise checked.exception()
    concurrent = check_cluster(spec)
    forward_sigterm_to_tune()
    data, cluster = checked.result(), ray.cluster_resources()
    gpus = f", {cluster['GPU']:g} GPUs" if cluster.get("GPU") else ""
    say(f"Ray is up ({cluster.get('CPU', 0):g} CPUs{gpus}); preflight passed ({len(data.train)} train, "
        f"{len(data.val)} validation examples); starting up to {concurrent} trial{'s' * (concurrent != 1)} at once")
    return concurrent


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


# ---------------------------------------------------------------- the summary

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


def run(args: argparse.Namespace) -> int:
    spec, search_dir = resolve_search_dir(args)
    if args.print_experiment:
        if spec is None:
            check_resumable(search_dir)
        print(search_dir)
        return 0
    notes: list[str] = []
    if args.more is not None:
        extend(search_dir, args.more, resuming=spec is None)
    if spec is None:
        spec, tuner = resume(search_dir, args.verbose, notes)
    else:
        tuner = start(spec, search_dir, args.spec, args.verbose)
    run_tuner(tuner, search_dir)
    code = write_summary(search_dir, notes)
    if code == 0 and spec.search.finalists.top_k > 0:
        from tune_llama.finalists import print_finalists, score_finalists
        from tune_llama.resources import worker_resources
        record = score_finalists(search_dir, worker_resources(spec))
        with (search_dir / SUMMARY_FILE).open("a") as summary:
            with contextlib.redirect_stdout(summary):
                print_finalists(record)
    return code



if __name__ == "__main__":  # python -m tune_llama.search is tune-llama search
    from tune_llama.__main__ import run_command
    run_command("search")
