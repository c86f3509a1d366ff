"""ASHA + Optuna TPE against FIFO random search: same spec, trials and budget, one invocation.

    .venv/bin/python bench/search_efficiency.py --samples 12 --epochs 4 --eval-every 0.25
    .venv/bin/python bench/search_efficiency.py --reduction-factor 4 --brackets 2 --json

asha: ``tune_llama.search.main``. random: the same trainable, space, samples, concurrency and epochs with
Ray's ``BasicVariantGenerator``, FIFO. Trial-steps: the sum over trials of the last step each reported
(trial-epochs: in epochs); best: the best ``search.metric`` of any report (``tune_llama.results``).
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
from tune_llama.results import SPEC_FILE, load_search  # noqa: E402
from tune_llama.spec import load_spec  # noqa: E402


def random_search(spec, storage: Path) -> None:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    (storage / "random").mkdir()
    (storage / "random" / SPEC_FILE).write_text(json.dumps(spec.to_dict()))  # what load_search reads
    s = spec.search
    tune.Tuner(search.trainable(spec), param_space=search.param_space(spec), tune_config=tune.TuneConfig(
        metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=FIFOScheduler(),
        search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)),
        run_config=tune.RunConfig(name="random", storage_path=str(storage), verbose=0)).fit()


def figures(folder: Path, seconds: float) -> dict:
    found = load_search(folder)
    best = found.best()
    ended = [t.rows[-1] for t in found.trials if t.rows]
    return {"trials": len(found.trials), "trial_steps": sum(r["step"] for r in ended),
            "trial_epochs": sum(r["epoch"] for r in ended),
            "best": best[1][found.metric] if best else float("nan"), "wall_s": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=str(common.REPO / "search_spaces" / "tiny.yaml"))
    options = {"--samples": ("search.num_samples", "12"), "--epochs": ("training.epochs", "4"),
               "--eval-every": ("training.eval_every", "0.25"), "--max-concurrent": ("search.max_concurrent", None),
               "--reduction-factor": ("search.asha.reduction_factor", None),
               "--grace-period": ("search.asha.grace_period", None), "--brackets": ("search.asha.brackets", None)}
    for flag, (field, default) in options.items():
        p.add_argument(flag, dest=field, default=default, metavar="VALUE",
                       help=f"{field} (default: {default or 'as in the spec'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    overrides = [f"{k}={v}" for k, v in vars(args).items() if "." in k and v is not None] + args.overrides
    storage = Path(tempfile.mkdtemp(prefix="bench-search-")).resolve()
    common.say(f"{args.spec} with {' '.join(overrides)}; searches in {storage}")
    spec = search.absolute_paths(load_spec(args.spec, overrides))
    results = {}
    with contextlib.redirect_stdout(sys.stderr):  # the search's summary and progress table: not the result
        start = time.perf_counter()
        code = search.main([args.spec, "--name", "asha", "--storage", str(storage),
                            *[x for o in overrides for x in ("--set", o)]])
        if code:
            sys.exit(f"the ASHA search exited {code}; see {storage / 'asha'}")
        results["asha"] = figures(storage / "asha", time.perf_counter() - start)
        start = time.perf_counter()
        random_search(spec, storage)
        results["random"] = figures(storage / "random", time.perf_counter() - start)
    asha, rand = results["asha"], results["random"]
    steps_share, loss_gap = asha["trial_steps"] / rand["trial_steps"], asha["best"] / rand["best"] - 1
    s = spec.search
    common.output(args, [{"search": k, **v} for k, v in results.items()],
                  [("search", "search"), ("trials", "trials"), ("trial_steps", "trial-steps"),
                   ("trial_epochs", "trial-epochs"), ("best", f"best {s.metric}"), ("wall_s", "wall s")],
                  {"asha_trial_steps": asha["trial_steps"], "random_trial_steps": rand["trial_steps"],
                   "asha_best": asha["best"], "random_best": rand["best"]},
                  f"ASHA: reduction factor {s.asha.reduction_factor}, grace period {search.grace_period(spec):g} "
                  f"epoch(s), {s.asha.brackets} bracket(s), max_t {spec.training.epochs} epochs\n"
                  f"trial-steps: ASHA used {steps_share:.0%} of random search's (goal <= 40%)\n"
                  f"best {s.metric}: ASHA {loss_gap:+.2%} against random search (goal <= +2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
