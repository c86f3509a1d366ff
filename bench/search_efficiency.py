"""The default search (the spec's scheduler, halving unless told, + Optuna TPE) against FIFO random search:
same spec, trials and budget.

    # tiny.yaml (the default spec) at 48 trials over 6 search seeds, the halving scheduler's own rungs:
    nice .venv/bin/python bench/search_efficiency.py --samples 48 --epochs 4 --eval-every 0.25
        --max-concurrent 2 --seeds 6 --default-rungs --no-random-sampler
    # the same with rungs of your own:
    ... --reduction-factor 4 --grace-period 0.25
    .venv/bin/python bench/search_efficiency.py --smoke-test      # 8 trials, one seed: about two minutes
    # the same with Ray's asynchronous ASHA:
    ... --scheduler asha
    # the embedded SmolLM2 on a real GSM8K slice, one trial at a time, then two trials x 1 core (~40 min each):
    .venv/bin/python bench/search_efficiency.py bench/specs/smollm2_gsm8k.yaml --json
    .venv/bin/python bench/search_efficiency.py bench/specs/smollm2_gsm8k.yaml --max-concurrent 2
        --set search.resources.cpu=1

Every option left out keeps the spec's value.

asha: ``tune-llama search`` with the spec's sampler (TPE) and scheduler (``search.scheduler``, default
``halving``; the table names the rows by the scheduler, the JSON keys keep ``asha``). asha-random-sampler: the same with
``search.sampler=random``, which separates what ASHA's stops save from where TPE moves the budget (TPE's later
configs are better, so more of them survive the rungs). random: the same trainable, space, samples, concurrency
and epochs, FIFO, with Optuna's random sampler: the very configs asha-random-sampler tried, so the two differ
only in ASHA's stops. Trial-steps: the sum over trials of the last step each
reported (trial-epochs: in epochs, the compute measure when gradient accumulation differs between trials);
best: the best ``search.metric`` of any report (``tune_llama.results``).
``--seeds N`` runs all three with ``search.seed`` 0..N-1 and gives mean and min-max of the share of FIFO's
trial-epochs and of best / FIFO's best. Every search starts from the spec's own config where the spec says so
(``search.include_spec_config``, on by default), FIFO included, so all of them try the same first config.
Best: among trials that trained to ``training.epochs``, as the search picks its winner. Goal: the default search
at <= 35% of FIFO's trial-epochs, its best within 1% of FIFO's on the mean over seeds, and never worse than what
FIFO had found after the same trial-epochs on any seed.
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

from tune_llama import tuner  # noqa: E402
from tune_llama.budget import halving_rungs  # noqa: E402
from tune_llama.__main__ import command  # noqa: E402
from tune_llama.results import SPEC_FILE, load_search  # noqa: E402
from tune_llama.search import absolute_paths  # noqa: E402
from tune_llama.warm_start import first_points  # noqa: E402
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
    first, _ = first_points(spec)
    config = dataclasses.replace(tuner.tune_config(spec, storage / name, spec.search.max_concurrent, first),
                                 scheduler=FIFOScheduler())
    tune.Tuner(tuner.trainable(spec), param_space=tuner.param_space(spec), tune_config=config,
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


def run_seed(args, overrides: list[str], storage: Path) -> dict[str, dict]:
    """The three searches of one search seed, in ``storage``: {name: figures}."""
    spec = absolute_paths(load_spec(args.spec, overrides))
    results = {}
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
    for found in results.values():  # what random search had found when it had spent as much
        found["random_best_same_epochs"] = best_within(storage / "random", found["trial_epochs"])
    for found in results.values():
        found["epochs_share"] = found["trial_epochs"] / results["random"]["trial_epochs"]
        found["best_vs_random"] = found["best"] / results["random"]["best"]
    results["random"]["rung_ranking"] = rung_ranking(storage / "random")
    return results


RUNG_SHARES = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def rung_ranking(folder: Path) -> dict[str, dict]:
    """How well a rung at each share of ``training.epochs`` ranks configs as full length does, from FIFO's
    trials (every one trained to full length): Spearman's rho between the loss at the rung (the first report at
    or past it) and the best loss to full length, over all trials and over the best quarter; and where the
    full-length best stood at the rung (0: first)."""
    found = load_search(folder)
    run = found.spec.training.epochs
    trials = [t for t in found.trials if t.rows and found.full_length(t)]
    final = [t.best(found.metric, found.mode)[found.metric] for t in trials]
    out = {}
    for share in RUNG_SHARES:
        at = [next(r[found.metric] for r in t.rows if r["epoch"] >= share * run - 1e-9) for t in trials]
        top = sorted(range(len(trials)), key=lambda i: final[i])[:max(3, len(trials) // 4)]
        best = min(range(len(trials)), key=lambda i: final[i])
        out[f"{share:g}"] = {"rho": spearman(at, final), "rho_best_quarter": spearman([at[i] for i in top],
                                                                                     [final[i] for i in top]),
                             "best_rank_at_rung": sorted(range(len(trials)), key=lambda i: at[i]).index(best)}
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else float("nan")


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=str(common.REPO / "search_spaces" / "tiny.yaml"))
    options = {"--samples": ("search.num_samples", None), "--epochs": ("training.epochs", None),
               "--eval-every": ("training.eval_every", None), "--max-concurrent": ("search.max_concurrent", None),
               "--reduction-factor": ("search.asha.reduction_factor", None),
               "--grace-period": ("search.asha.grace_period", None), "--brackets": ("search.asha.brackets", None),
               "--scheduler": ("search.scheduler", None)}
    for flag, (field, default) in options.items():
        p.add_argument(flag, dest=field, default=default, metavar="VALUE",
                       help=f"{field} (default: {default or 'as in the spec'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run every search with search.seed = 0 .. N-1 (FIFO's draws follow the seed too) and "
                        "give mean and min-max over them")
    p.add_argument("--first-seed", type=int, default=0, metavar="K",
                   help="seeds K .. K+N-1 instead of 0 .. N-1 (to spread seeds over several runs)")
    p.add_argument("--summarize", nargs="+", type=Path, metavar="DIR",
                   help="run nothing: print the result of earlier runs from their searches' folders "
                        "(per_seed.json in each, as printed on stderr), seeds merged")
    p.add_argument("--no-random-sampler", dest="random_sampler", action="store_false",
                   help="skip the search with search.sampler=random (with num_samples <= 10 TPE has not left "
                        "its random start-up trials, so it would repeat the TPE search)")
    p.add_argument("--default-rungs", action="store_true",
                   help="the halving scheduler's own rungs (search.asha.grace_period and reduction_factor unset), "
                        "whatever the spec sets")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--smoke-test", action="store_true", help="8 trials of 2 epochs, one seed, no random-sampler row")
    args = p.parse_args(argv)
    if args.smoke_test:
        args = p.parse_args(["--samples", "8", "--epochs", "2", "--eval-every", "0.5", "--no-random-sampler",
                             *(argv if argv is not None else sys.argv[1:])])
    if args.seeds < 1:
        p.error(f"--seeds: must be >= 1, got {args.seeds}")
    overrides = [f"{k}={v}" for k, v in vars(args).items() if "." in k and v is not None] + args.overrides
    if args.default_rungs:
        overrides += ["search.asha.grace_period=null", "search.asha.reduction_factor=null"]
    storage = Path(tempfile.mkdtemp(prefix="bench-search-")).resolve()
    common.say(f"{args.spec} with {' '.join(overrides)}, {args.seeds} seed(s); searches in {storage}")
    spec = absolute_paths(load_spec(args.spec, overrides))
    per_seed = {int(k): v for d in args.summarize or [] for k, v in json.loads((d / "per_seed.json").read_text()).items()}
    if args.summarize:  # the searches' own spec, not this invocation's flags
        from tune_llama.results import load_search
        first = args.summarize[0]
        spec = load_search(first / f"seed{min(json.loads((first / 'per_seed.json').read_text()), key=int)}" / "random").spec
    with contextlib.redirect_stdout(sys.stderr):  # the search's summary and progress table: not the result
        for seed in [] if args.summarize else range(args.first_seed, args.first_seed + args.seeds):
            (storage / f"seed{seed}").mkdir()
            per_seed[seed] = run_seed(args, overrides + [f"search.seed={seed}"], storage / f"seed{seed}")
            (storage / "per_seed.json").write_text(json.dumps(per_seed, indent=1))  # kept if a later seed fails
            common.say(f"seed {seed}: " + ", ".join(f"{k} {v['epochs_share']:.0%} of FIFO's trial-epochs, best "
                                                   f"{v['best_vs_random'] - 1:+.2%}" for k, v in per_seed[seed].items()))
    s = spec.search
    names = [n for n in ("asha", "asha-random-sampler", "random") if any(n in found for found in per_seed.values())]
    summary = {name: {key: spread([found[name][key] for found in per_seed.values() if name in found])
                      for key in ("epochs_share", "best_vs_random", "trial_epochs", "trial_steps", "full", "best")}
               for name in names}  # merged runs may differ in --no-random-sampler: each row over its own seeds
    payload = {}
    for name, prefix in (("asha", "asha"), ("asha-random-sampler", "asha_random_sampler")):
        if name in summary:
            payload[f"{prefix}_trial_steps"] = summary[name]["trial_steps"]["mean"]
            payload[f"{prefix}_best"] = summary[name]["best"]["mean"]
            for stat in ("mean", "min", "max"):
                payload[f"{prefix}_trial_epochs_share_{stat}"] = summary[name]["epochs_share"][stat]
                payload[f"{prefix}_best_vs_random_{stat}"] = summary[name]["best_vs_random"][stat]
    payload.update(random_trial_steps=summary["random"]["trial_steps"]["mean"],
                   random_best=summary["random"]["best"]["mean"], seeds=len(per_seed))

    shown = {"asha": s.scheduler, "asha-random-sampler": f"{s.scheduler}-random-sampler", "random": "random"}
    rows = [{"search": shown[name], "seed": seed, **per_seed[seed][name]} for name in names
            for seed in sorted(per_seed) if name in per_seed[seed]]
    if s.scheduler == "halving":
        rungs = ", ".join(f"epoch {epoch:g} keeping 1/{factor}" for epoch, factor in halving_rungs(spec))
    else:
        rungs = f"grace period {tuner.grace_period(spec):g}, factor {s.asha.reduction_factor or 2}"
    lines = [f"scheduler {s.scheduler} (rungs: {rungs}), max_t {spec.training.epochs} epochs, max_concurrent "
             f"{s.max_concurrent}, {s.num_samples} trials"]
    label = {"asha": f"{s.scheduler} + Optuna {s.sampler.upper()} (the default search)",
             "asha-random-sampler": f"{s.scheduler} + Optuna random sampler"}
    for name in names[:-1]:
        share, best = summary[name]["epochs_share"], summary[name]["best_vs_random"]
        seeds = sorted(seed for seed, found in per_seed.items() if name in found)
        lines.append(f"{label[name]}, seeds {seeds}: {share['mean']:.0%} of FIFO's trial-epochs (min-max {share['min']:.0%}-"
                     f"{share['max']:.0%}; goal <= 35%), best {s.metric} {best['mean'] - 1:+.2%} against FIFO's "
                     f"(min-max {best['min'] - 1:+.2%} to {best['max'] - 1:+.2%}; goal <= +1%)")
    for share in RUNG_SHARES:
        key = f"{share:g}"
        ranking = [found["random"]["rung_ranking"][key] for found in per_seed.values()
                   if "rung_ranking" in found.get("random", {})]
        if ranking:
            payload[f"rung_{key}_rho_best_quarter_mean"] = sum(r["rho_best_quarter"] for r in ranking) / len(ranking)
            lines.append(f"rung at {key} of the run (FIFO's trials): rho {min(r['rho'] for r in ranking):.2f}-"
                         f"{max(r['rho'] for r in ranking):.2f} over all, {min(r['rho_best_quarter'] for r in ranking):.2f}-"
                         f"{max(r['rho_best_quarter'] for r in ranking):.2f} over the best quarter; the full-length best "
                         f"stood at place {', '.join(str(r['best_rank_at_rung'] + 1) for r in ranking)} there")
    common.output(args, rows,
                  [("search", "search"), ("seed", "seed"), ("trials", "trials"), ("full", "ran to max_t"),
                   ("trial_steps", "trial-steps"), ("trial_epochs", "trial-epochs"),
                   ("epochs_share", "share of FIFO"), ("best", f"best {s.metric}"),
                   ("best_vs_random", "best / FIFO's"), ("random_best_same_epochs", "FIFO's best at same epochs"),
                   ("wall_s", "wall s")],
                  payload, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
