"""Building a search's Ray Tune ``Tuner`` from its spec: the search space, the trial function, Optuna's
sampler and the scheduler, the callbacks; starting (or joining) Ray while preflight checks the input; and
the Tuner of a new search or of one that resumes, with its Optuna study rebuilt where it was lost.

Imports Ray and Optuna: ``tune_llama.search``, the command, imports this module only once it has said that
Ray is starting (importing Ray takes seconds), and ``--help`` or bad input never waits for it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from tune_llama.budget import Plan, halving_rungs, patience, trials_spec
from tune_llama.callbacks import ForgetLostCheckpoints, SameErrorStop, StateBackup, result_loggers, worker_callbacks
from tune_llama.live import LIVE_DIR
from tune_llama.paths import read_json
from tune_llama.preflight import TokenizedData, check_cluster, check_model_setup, preflight
from tune_llama.progress_bar import say
from tune_llama.ray_private import point_search_generator_at, point_tuner_state_at
from tune_llama.resources import tune_trial_resources
from tune_llama.results import OPTUNA_DB, SPEC_FILE, load_search
from tune_llama.scheduler import HalvingScheduler, WaitingLimiter
from tune_llama.searcher import ResumableOptunaSearch
from tune_llama.spec import Spec
from tune_llama.summary import SAMPLER_FILE
from tune_llama.study import DAMAGED_SUFFIX, move_aside, rebuild_study, study_name, study_readable
from tune_llama.tracking import callbacks as tracking_callbacks
from tune_llama.trainable import train_trial
from tune_llama.trial_table import progress_callbacks


# ---------------------------------------------------------------- what the Tuner is made of

def param_space(spec: Spec) -> dict[str, Any]:
    """The spec's YAML space as Tune distributions (validated by the schema already)."""
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


def trainable(spec: Spec, search_dir: Optional[Path] = None, plan: Optional[Plan] = None):
    """The trial function with the spec bound (with a budget plan, as long as the winner's run); with
    ``search_dir``, trials tell the live table where they are."""
    return tune.with_resources(tune.with_parameters(train_trial, spec=trials_spec(spec, plan).to_dict(),
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
    s = spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s.seed, constant_liar=True, multivariate=True,
                                          n_startup_trials=startup_trials(spec))


def startup_trials(spec: Spec) -> Optional[int]:
    """How many start-up trials the sampler of ``spec`` runs before TPE models the results: a quarter of the
    search, 5 to 10 (configs proposed first, the spec's own or a warm start's, count among them; the rest are
    drawn at random); None for ``search.sampler: random``, where every trial is drawn at random."""
    s = spec.search
    return None if s.sampler == "random" else min(10, max(5, (s.num_samples or 0) // 4))


def record_sampler(spec: Spec, search_dir: Path, given: int) -> None:
    """Write how the new search's sampler draws (``summary.SAMPLER_FILE``: the live table, summary and report
    mark the random trials), and say in one line when no trial will be TPE's: a search of no more trials than
    TPE's start-up is a random search."""
    startup, total = startup_trials(spec), spec.search.num_samples or 0
    (search_dir / SAMPLER_FILE).write_text(json.dumps({"sampler": spec.search.sampler, "startup_trials": startup,
                                                        "given": given}))
    if startup is not None and total <= startup and given < total:
        print(f"note: a random search: search.num_samples={total} is no more than TPE's {startup} start-up trials, "
              f"so {total - given} trial{'s' * (total - given != 1)} are drawn at random"
              f"{f' after {given} given' if given else ''} and none is proposed by TPE; TPE needs "
              f"search.num_samples={startup + 1} or more (or --resume DIR --more N later)", file=sys.stderr)


def tune_config(spec: Spec, search_dir: Path, concurrent: int, first: Optional[list[dict[str, Any]]] = None,
                plan: Optional[Plan] = None):
    """Optuna (in SQLite), the scheduler ``search.scheduler`` names on the fractional epoch, and at most
    ``concurrent`` trials at once (trials paused at a rung not counted); ``first``: configs Optuna proposes
    before its own (the spec's own, ``warm_start``'s); ``plan``: a budget's rungs and winner."""
    s = spec.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = ResumableOptunaSearch(sampler=sampler(spec), search_dir=search_dir, study_name=study_name(search_dir),
                                     points_to_evaluate=first or None, full_length=spec.training.epochs)
    limiter = WaitingLimiter(searcher, max_concurrent=concurrent)
    # The time unit is the fractional epoch each report carries: reports inside an epoch are the rungs.
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.training.epochs, grace_period=grace_period(spec),
                                  reduction_factor=s.asha.reduction_factor or 2, brackets=s.asha.brackets)
    else:
        scheduler = HalvingScheduler(search_dir, limiter, time_attr="epoch", max_t=spec.training.epochs,
                                     rungs=halving_rungs(spec), plan=plan, patience=patience(spec))
    # A new trial reuses an ended trial's process: no interpreter, torch import or CUDA context to start again
    # (seconds per trial, most of a short trial's overhead). Ray Train trials keep their own worker groups.
    return tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
                           search_alg=limiter, reuse_actors=s.resources.workers == 1)


def run_config(spec: Spec, search_dir: Path, verbose: bool):
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
                   *tracking_callbacks(spec, search_dir.name, spec_name=spec_name(search_dir)),
                   *progress_callbacks(spec, verbose, search_dir), *worker_callbacks(spec), *result_loggers()],
        verbose=None if verbose else 0,
    )


def spec_name(search_dir: Path) -> Optional[str]:
    """The stem of the YAML file the search was started from (W&B tags it), as its spec copy recorded it."""
    record = read_json(search_dir / SPEC_FILE)
    return record.get("_spec_name") if isinstance(record, dict) else None


# ---------------------------------------------------------------- the Tuner of a new search, or of one that resumes

def new_tuner(spec: Spec, search_dir: Path, concurrent: int, first: Optional[list[dict[str, Any]]], verbose: bool,
              plan: Optional[Plan] = None):
    """The Tuner of a new search in ``search_dir``, at most ``concurrent`` trials at once, ``first`` proposed
    first, sized by ``plan`` where it has a budget."""
    record_sampler(spec, search_dir, len(first or []))
    return tune.Tuner(trainable(spec, search_dir, plan), param_space=param_space(spec),
                      tune_config=tune_config(spec, search_dir, concurrent, first, plan),
                      run_config=run_config(spec, search_dir, verbose))


def can_restore(search_dir: Path) -> bool:
    """Whether Tune finds its own state in ``search_dir``."""
    return tune.Tuner.can_restore(str(search_dir))


def restored_tuner(spec: Spec, search_dir: Path, concurrent: int, verbose: bool, plan: Optional[Plan] = None):
    """The Tuner that continues the search in ``search_dir``: unfinished trials go on, errored ones are retried.

    Its searcher, scheduler, callbacks and stopper are built for ``search_dir`` and written into Tune's state
    there first: ``Tuner.restore`` would otherwise bring back those of the search's first start, pickled with
    that folder's paths (a copied or moved folder would read and write the original's files).
    """
    point_tuner_state_at(search_dir, tune_config(spec, search_dir, concurrent, plan=plan),
                         run_config(spec, search_dir, verbose))
    point_search_generator_at(search_dir)  # and the trials it has yet to create
    return tune.Tuner.restore(str(search_dir), trainable(spec, search_dir, plan), resume_unfinished=True,
                              resume_errored=True, param_space=param_space(spec))


def restore_study(search_dir: Path, spec: Spec) -> Optional[str]:
    """Rebuild ``optuna.db`` from the trial folders when it cannot be read or is missing (``tune_llama.study``);
    a line saying so, or None when the study was fine. Before ``Tuner.restore``: it unpickles the searcher,
    whose storage opens the database."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our notice says it; not Optuna's "new study" lines
    if study_readable(search_dir):
        return None
    why = f"could not be read (moved to {OPTUNA_DB}{DAMAGED_SUFFIX})" if move_aside(search_dir) else "was missing"
    restored = rebuild_study(load_search(search_dir), OptunaSearch.convert_search_space(param_space(spec)))
    return f"study: {OPTUNA_DB} {why}; rebuilt from the trial folders, {restored} trials restored"


# ---------------------------------------------------------------- Ray

def init_ray(spec: Spec, verbose: bool) -> None:
    """Join the cluster in $RAY_ADDRESS (Slurm, multi-node), else start a local Ray of our own."""
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


def start_ray(spec: Spec, verbose: bool, inputs: Optional[TokenizedData] = None) -> int:
    """Run the slow part of preflight in a thread while Ray starts (or is joined) in this one; return how many
    trials may run at once on it (``preflight.check_cluster``: one line if a trial cannot run there).
    ``inputs``: what ``preflight.check_inputs`` read before Ray (a new search: bad paths, data and max_length
    fail at once), so at most ``check_model_setup`` is left (a hub model's); without them (a resume) all of
    ``preflight`` runs.

    Both take seconds, and Ray's start is mostly waiting for its processes (the search has said so before
    importing this module: ``search.say_ray_starts``). Ray must start in the main thread: it sets a signal
    handler, and the processes it spawns die with the thread that spawned them. When preflight refuses the
    input, the Ray started here is shut down again, so bad input leaves no Ray behind.
    """
    def checks() -> TokenizedData:
        if inputs is None:
            return preflight(spec, search=True)
        if not inputs.model_checked:
            check_model_setup(spec)
        return inputs

    started_here = not ray.is_initialized()
    with ThreadPoolExecutor(1, thread_name_prefix="preflight") as pool:
        checked = pool.submit(checks)
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
