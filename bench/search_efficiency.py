"""ASHA + Optuna TPE against FIFO random search: same spec, trials and budget, one invocation.

    # tiny.yaml (the default spec), about 8 min:
    .venv/bin/python bench/search_efficiency.py --samples 24 --epochs 4 --eval-every 0.25 --reduction-factor 4
        --grace-period 0.25 --max-concurrent 2
    # the embedded SmolLM2 on a real GSM8K slice, one trial at a time, then two trials x 1 core (~40 min each):
    .venv/bin/python bench/search_efficiency.py bench/specs/smollm2_gsm8k.yaml --json
    .venv/bin/python bench/search_efficiency.py bench/specs/smollm2_gsm8k.yaml --max-concurrent 2
        --set search.resources.cpu=1

Every option left out keeps the spec's value.

asha: ``tune-llama search`` with the spec's sampler (TPE). asha-random-sampler: the same with
``search.sampler=random``, which separates what ASHA's stops save from where TPE moves the budget (TPE's later
configs are better, so more of them survive the rungs). random: the same trainable, space, samples, concurrency
and epochs, FIFO, with Optuna's random sampler: the very configs asha-random-sampler tried, so the two differ
only in ASHA's stops. Trial-steps: the sum over trials of the last step each
reported (trial-epochs: in epochs, the compute measure when gradient accumulation differs between trials);
best: the best ``search.metric`` of any report (``tune_llama.results``).
Goal: asha_trial_steps <= 40% of random_trial_steps, asha_best within 2% of random_best (or better).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

from tune_llama import search  # noqa: E402
from tune_llama.__main__ import command  # noqa: E402
from tune_llama.results import SPEC_FILE, load_search  # noqa: E402
from tune_llama.spec import load_spec  # noqa: E402


def random_search(spec, storage: Path, name: str = "random") -> None:
    """FIFO random search: the spec's trainable, space, samples and concurrency, no early stopping, and
    Optuna's random sampler with the spec's seed: the same configs, in the same order, as the ASHA search
    with ``search.sampler=random``, so the two differ only in ASHA's stops."""
    import dataclasses

    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, sampler="random"))
    (storage / name).mkdir()
    (storage / name / SPEC_FILE).write_text(json.dumps(spec.to_dict()))  # what load_search reads
    config = dataclasses.replace(search.tune_config(spec, storage / name, spec.search.max_concurrent),
                                 scheduler=FIFOScheduler())
    tune.Tuner(search.trainable(spec), param_space=search.param_space(spec), tune_config=config,
               run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0)).fit()


def figures(folder: Path, seconds: float) -> dict:
    found = load_search(folder)
    best = found.best()
    ended = [t.rows[-1] for t in found.trials if t.rows]
    return {"trials": len(found.trials), "trial_steps": sum(r["step"] for r in ended),
            "trial_epochs": sum(r["epoch"] for r in ended),
            "full": sum(r["epoch"] >= found.spec.training.epochs - 1e-9 for r in ended),
            "best": best[1][found.metric] if best else float("nan"), "wall_s": seconds}


def best_within(folder: Path, epochs: float) -> float:
    """The best metric of the FIFO search's trials in the order they started, counting each trial's
    epochs (and the part of the last one that fits) until ``epochs`` are spent."""
    found = load_search(folder)
    spent, best = 0.0, float("nan")
    sign = 1 if found.mode == "min" else -1
    for trial in sorted((t for t in found.trials if t.rows), key=lambda t: t.rows[0].get("timestamp", 0)):
        for row in trial.rows:
            if spent + row["epoch"] > epochs + 1e-9:
                return best
            value = row[found.metric]
            if best != best or sign * value < sign * best:
                best = value
        spent += trial.rows[-1]["epoch"]
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=str(common.REPO / "search_spaces" / "tiny.yaml"))
    options = {"--samples": ("search.num_samples", None), "--epochs": ("training.epochs", None),
               "--eval-every": ("training.eval_every", None), "--max-concurrent": ("search.max_concurrent", None),
               "--reduction-factor": ("search.asha.reduction_factor", None),
               "--grace-period": ("search.asha.grace_period", None), "--brackets": ("search.asha.brackets", None)}
    for flag, (field, default) in options.items():
        p.add_argument(flag, dest=field, default=default, metavar="VALUE",
                       help=f"{field} (default: {default or 'as in the spec'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-random-sampler", dest="random_sampler", action="store_false",
                   help="skip the ASHA search with search.sampler=random (with num_samples <= 10 TPE has not left "
                        "its random start-up trials, so it would repeat the TPE search)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    overrides = [f"{k}={v}" for k, v in vars(args).items() if "." in k and v is not None] + args.overrides
    storage = Path(tempfile.mkdtemp(prefix="bench-search-")).resolve()
    common.say(f"{args.spec} with {' '.join(overrides)}; searches in {storage}")
    spec = search.absolute_paths(load_spec(args.spec, overrides))
    results = {}
    with contextlib.redirect_stdout(sys.stderr):  # the search's summary and progress table: not the result
        searches = [("asha", [])] + ([("asha-random-sampler", ["search.sampler=random"])] if args.random_sampler else [])
        for name, extra in searches:
            start = time.perf_counter()
            code = command("search")([args.spec, "--name", name, "--storage", str(storage),
                                *[x for o in overrides + extra for x in ("--set", o)]])
            if code:
                sys.exit(f"the {name} search exited {code}; see {storage / name}")
            results[name] = figures(storage / name, time.perf_counter() - start)
        start = time.perf_counter()
        random_search(spec, storage)
        results["random"] = figures(storage / "random", time.perf_counter() - start)
    asha, sampled, rand = results["asha"], results.get("asha-random-sampler"), results["random"]
    for found in results.values():  # what random search had found when it had spent as much
        found["random_best_same_epochs"] = best_within(storage / "random", found["trial_epochs"])
    s = spec.search

    def verdict(name: str, found: dict) -> str:
        return (f"{name}: {found['trial_steps'] / rand['trial_steps']:.0%} of random search's trial-steps "
                f"({found['trial_epochs'] / rand['trial_epochs']:.0%} of its trial-epochs; goal <= 40%), "
                f"best {s.metric} {found['best'] / rand['best'] - 1:+.2%} against it (goal <= +2%); "
                f"random search's best after as many trial-epochs: {found['random_best_same_epochs']:.4g}")

    common.output(args, [{"search": k, **v} for k, v in results.items()],
                  [("search", "search"), ("trials", "trials"), ("full", "ran to max_t"),
                   ("trial_steps", "trial-steps"), ("trial_epochs", "trial-epochs"), ("best", f"best {s.metric}"),
                   ("wall_s", "wall s")],
                  {"asha_trial_steps": asha["trial_steps"], "random_trial_steps": rand["trial_steps"],
                   "asha_best": asha["best"], "random_best": rand["best"],
                   **({"asha_random_sampler_trial_steps": sampled["trial_steps"],
                       "asha_random_sampler_best": sampled["best"]} if sampled else {})},
                  f"ASHA: reduction factor {s.asha.reduction_factor}, grace period {search.grace_period(spec):g} "
                  f"epoch(s), {s.asha.brackets} bracket(s), max_t {spec.training.epochs} epochs, "
                  f"max_concurrent {s.max_concurrent}\n"
                  f"{verdict('ASHA + Optuna ' + s.sampler.upper(), asha)}"
                  + (f"\n{verdict('ASHA + Optuna random sampler', sampled)}" if sampled else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
