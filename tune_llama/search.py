"""Hyperparameter search: ``python -m tune_llama.search SPEC [--name NAME] [--storage DIR] [--set k=v] [--resume]``.

Optuna TPE proposes configs, ASHA stops poor trials early, Ray keeps the best
checkpoints. ``--resume`` (or ``--resume results/NAME``) continues an
interrupted search: searcher and scheduler state come back, unfinished trials
continue from their last checkpoint and errored ones are retried.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tune_llama.errors import UserError
from tune_llama.cli import add_set_argument, run_cli
from tune_llama.spec import Spec, load_spec, spec_from_dict

SPEC_FILE = "tune_llama_spec.json"
OPTUNA_DB = "optuna.db"


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


def trial_resources(spec: Spec) -> dict[str, float]:
    import torch
    gpu = spec.search.resources.gpu
    if gpu is None:
        gpu = 1.0 if torch.cuda.is_available() else 0.0
    return {"cpu": spec.search.resources.cpu, "gpu": gpu}


def trainable(spec: Spec):
    from ray import tune
    from tune_llama.trainable import train_trial
    return tune.with_resources(tune.with_parameters(train_trial, spec=spec.to_dict()), trial_resources(spec))


def tune_config(spec: Spec, experiment: Path):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from tune_llama.searcher import ResumableOptunaSearch

    s = spec.search
    storage = optuna.storages.RDBStorage(f"sqlite:///{experiment / OPTUNA_DB}")
    searcher = ResumableOptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed), storage=storage,
                            study_name=experiment.name)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.training.epochs, grace_period=s.asha.grace_period,
                              reduction_factor=s.asha.reduction_factor)
    return tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
                           search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent))


def run_config(spec: Spec, experiment: Path):
    from ray import tune
    from tune_llama.tracking import callbacks

    s = spec.search
    return tune.RunConfig(
        name=experiment.name,
        storage_path=str(experiment.parent),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints, checkpoint_score_attribute=s.metric,
                                                checkpoint_score_order=s.mode),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        callbacks=callbacks(spec, experiment.name),
    )


def init_ray(spec: Spec) -> None:
    """Join the cluster in $RAY_ADDRESS (Slurm, multi-node), else start a local Ray."""
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level="WARNING")


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


def experiment_dir(storage: Optional[Path], name: str) -> Path:
    root = (storage or Path("results")).expanduser().resolve()  # Ray needs absolute storage paths
    return root / name


def start(spec: Spec, experiment: Path):
    from ray import tune
    if (experiment / SPEC_FILE).exists():
        raise UserError(f"{experiment} already holds a search: resume it with --resume {experiment}, "
                        "or pick another --name")
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1))
    init_ray(spec)
    forward_sigterm_to_tune()
    return tune.Tuner(trainable(spec), param_space=param_space(spec), tune_config=tune_config(spec, experiment),
                      run_config=run_config(spec, experiment))


def resume(experiment: Path):
    from ray import tune
    if not experiment.is_dir():
        raise UserError(f"--resume: {experiment} does not exist")
    if not (experiment / SPEC_FILE).is_file() or not tune.Tuner.can_restore(str(experiment)):
        raise UserError(f"--resume: {experiment} is not a tune-llama search folder (no {SPEC_FILE} or Tune state)")
    spec = load_search_spec(experiment)
    init_ray(spec)
    forward_sigterm_to_tune()
    return spec, tune.Tuner.restore(str(experiment), trainable(spec), resume_unfinished=True, resume_errored=True)


def load_search_spec(experiment: Path) -> Spec:
    return spec_from_dict(json.loads((experiment / SPEC_FILE).read_text()))


def summarize(spec: Spec, results, experiment: Path) -> int:
    """Print the best trial and the commands that follow (also into summary.txt); 0 when finished."""
    metric, mode = spec.search.metric, spec.search.mode
    from ray import tune
    statuses = [t.status for t in tune.ExperimentAnalysis(str(experiment)).trials]
    unfinished = [s for s in statuses if s not in ("TERMINATED", "ERROR")]
    lines = [f"search folder: {experiment}",
             f"trials: {len(statuses)} ({statuses.count('TERMINATED')} finished or stopped by ASHA, "
             f"{statuses.count('ERROR')} errored, {len(unfinished)} unfinished)"]
    try:
        best = results.get_best_result(metric=metric, mode=mode, scope="all")
    except RuntimeError:
        best = None
    if best is None or best.metrics_dataframe is None or metric not in best.metrics_dataframe:
        lines.append("no trial reported a result yet")
    else:
        frame = best.metrics_dataframe
        row = frame.loc[frame[metric].idxmin() if mode == "min" else frame[metric].idxmax()]
        lines += [f"best trial: {Path(best.path).name}",
                  f"  params: {json.dumps(best.config)}",
                  f"  best epoch: {int(row['epoch'])}  eval_loss: {row['eval_loss']:.4f}  "
                  f"eval_perplexity: {row['eval_perplexity']:.3f}"]
    where = os.path.relpath(experiment) if experiment.is_relative_to(Path.cwd()) else str(experiment)
    lines += ["next:",
              f"  export:   python -m tune_llama.export {where}",
              f"  report:   python -m tune_llama.report {where}",
              f"  resume:   python -m tune_llama.search --resume {where}"]
    text = "\n".join(lines)
    print("\n" + text)
    (experiment / "summary.txt").write_text(text + "\n")
    if unfinished or len(statuses) < spec.search.num_samples:
        print(f"the search was interrupted: continue it with --resume {where}")
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_llama.search", description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", help="YAML spec, e.g. search_spaces/sgd.yaml")
    parser.add_argument("--name", help="experiment name (default: SPEC stem and a timestamp)")
    parser.add_argument("--storage", type=Path, help="folder that holds searches (default results/)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="resume the search in DIR (or the one SPEC/--name point to)")
    add_set_argument(parser)
    args = parser.parse_args(argv)

    if args.resume is not None:
        if isinstance(args.resume, str):
            experiment = Path(args.resume).expanduser().resolve()
        elif args.name:
            experiment = experiment_dir(args.storage, args.name)
        else:
            raise UserError("--resume needs a search folder (--resume results/NAME) or --name NAME")
        spec, tuner = resume(experiment)
    else:
        if not args.spec:
            raise UserError("give a spec (e.g. search_spaces/tiny.yaml) or --resume DIR")
        spec = absolute_paths(load_spec(args.spec, args.overrides))
        if not spec.search.space:
            raise UserError(f"search.space: {args.spec} names no field to search")
        name = args.name or f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        experiment = experiment_dir(args.storage, name)
        tuner = start(spec, experiment)
    results = tuner.fit()
    return summarize(spec, results, experiment)


if __name__ == "__main__":
    run_cli(main)
