"""ASHA + Optuna TPE against FIFO random search, same trials budget, same seeds, one invocation.

    python bench/search_efficiency.py [--spec search_spaces/tiny.yaml] [--samples 16] [--epochs 8]

Prints the trial-epochs each search used and the best eval loss each found.
The goal: ASHA + Optuna uses at most 40% of the epochs, with a best eval loss
within 2% of random search's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import FIFOScheduler  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402

from tune_llama.search import param_space, trainable, tune_config  # noqa: E402
from tune_llama.spec import load_spec  # noqa: E402


def run(name: str, spec, storage: Path, config) -> dict:
    start = time.perf_counter()
    tuner = tune.Tuner(trainable(spec), param_space=param_space(spec), tune_config=config,
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0))
    results = tuner.fit()
    frames = [r.metrics_dataframe for r in results if r.metrics_dataframe is not None]
    return {
        "trials": len(results),
        "trial_epochs": sum(len(f) for f in frames),
        "best_eval_loss": min(f[spec.search.metric].min() for f in frames),
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "search_spaces" / "tiny.yaml"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    spec = load_spec(args.spec, [f"search.num_samples={args.samples}", f"training.epochs={args.epochs}",
                                 f"search.asha.reduction_factor={args.reduction_factor}", *args.overrides])
    storage = Path(tempfile.mkdtemp(prefix="search-efficiency-")).resolve()
    ray.init(include_dashboard=False, logging_level="ERROR")
    s = spec.search

    (storage / "asha_optuna").mkdir()  # the Optuna study's SQLite file lives there
    asha = run("asha_optuna", spec, storage, tune_config(spec, storage / "asha_optuna"))
    fifo = run("fifo_random", spec, storage, tune.TuneConfig(
        metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=FIFOScheduler(),
        search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)))

    print(f"\nspec {args.spec}: {args.samples} trials x up to {args.epochs} epochs, "
          f"ASHA grace {s.asha.grace_period}, reduction factor {s.asha.reduction_factor}")
    print(f"{'search':<14}{'trials':>8}{'trial-epochs':>14}{'best eval_loss':>16}{'wall s':>9}")
    for name, r in (("asha+optuna", asha), ("fifo random", fifo)):
        print(f"{name:<14}{r['trials']:>8}{r['trial_epochs']:>14}{r['best_eval_loss']:>16.4f}{r['wall_s']:>9.0f}")
    epochs_share = asha["trial_epochs"] / fifo["trial_epochs"]
    loss_gap = asha["best_eval_loss"] / fifo["best_eval_loss"] - 1
    print(f"epochs used: {epochs_share:.0%} of random search (goal <= 40%)")
    print(f"best eval loss: {loss_gap:+.2%} against random search (goal within 2%)")


if __name__ == "__main__":
    main()
