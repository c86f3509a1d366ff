"""Search throughput with several trials at once on one machine: trial-steps per hour, same work each way.

    .venv/bin/python bench/concurrency.py                          # CPU: 1 trial x all cores vs 2 x half
    .venv/bin/python bench/concurrency.py --gpu-shares 1 0.5 0.25  # one GPU: 1, 2 and 4 trials on it
    .venv/bin/python bench/concurrency.py --json    # {setting: trial-steps per hour, ..., "peak_memory_gb": {...}}

Each setting runs the same ``--trials`` trials (the spec's config, seeds 0..N-1, FIFO, no early stopping)
through Ray Tune in one Ray session, with ``search.resources`` split so that ``concurrent`` trials fill the
machine (CPU: cores / concurrent each; GPU: ``gpu: share``). Trial-steps per hour = the optimizer steps all
trials took x 3600 / the wall time of ``Tuner.fit`` (trial start-up and checkpoints included: what a search
pays). Also printed: real tokens per second summed over trials, and the ratio to the first setting.
``--rounds`` repeats the settings interleaved (A B, B A, ...) and prints min / median / max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)
from search_efficiency import random_search  # noqa: E402

SPEC = common.REPO / "bench" / "specs" / "smollm2_gsm8k.yaml"
DEFAULTS = ["training.epochs=1", "training.eval_every=0.5"]
"""Before ``--set``: one epoch, two reports per trial."""


def settings(args, cpus: int) -> list[dict]:
    if args.gpu_shares:
        return [{"name": f"{round(1 / g)} x gpu {g:g}", "concurrent": round(1 / g), "gpu": g,
                 "cpu": max(cpus // round(1 / g), 1)} for g in args.gpu_shares]
    return [{"name": f"{c} x cpu {cpus // c}", "concurrent": c, "gpu": 0, "cpu": cpus // c}
            for c in args.cpu_concurrency]


def run_setting(args, setting: dict, storage: Path, name: str) -> dict:
    from tune_llama.results import load_search
    from tune_llama.search import absolute_paths
    from tune_llama.spec import load_spec
    spec = load_spec(args.spec, [*DEFAULTS, *args.overrides, f"search.num_samples={args.trials}",
                                 f"search.max_concurrent={setting['concurrent']}",
                                 f"search.resources.cpu={setting['cpu']}", f"search.resources.gpu={setting['gpu']}",
                                 "training.device=auto"])
    spec = absolute_paths(spec)
    spec.search.space = {"training.seed": {"choice": list(range(args.trials))}}
    start = time.perf_counter()
    random_search(spec, storage, name)
    wall = time.perf_counter() - start
    ended = [t.rows[-1] for t in load_search(storage / name).trials if t.rows]
    steps, tokens = sum(r["step"] for r in ended), sum(r["tokens_seen"] for r in ended)
    common.say(f"{setting['name']}: {len(ended)} trials, {steps} steps in {wall:.0f} s")
    return {"steps_per_hour": steps * 3600 / wall, "tokens_per_s": tokens / wall, "wall_s": wall,
            "peak_gb": max((r.get("peak_memory_gb", 0.0) for r in ended), default=0.0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=str(SPEC))
    p.add_argument("--trials", type=int, default=4, help="trials per setting (default %(default)s)")
    p.add_argument("--cpu-concurrency", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="CPU: trials at once, each with cores / N (default 1 2)")
    p.add_argument("--gpu-shares", type=float, nargs="+", metavar="G", help="GPU: search.resources.gpu values")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    common.add_smoke_test(p)
    args = p.parse_args(argv)
    common.smoke_test(args, p, spec=str(common.REPO / "search_spaces" / "tiny.yaml"), trials=2)
    if args.smoke_test:
        args.overrides = ["data.synthetic_size=64", *args.overrides]
    import ray
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    chosen = settings(args, cpus)
    storage = Path(tempfile.mkdtemp(prefix="bench-concurrency-")).resolve()
    common.say(f"{args.spec}: {args.trials} trials per setting, {cpus} CPUs, "
               f"{ray.cluster_resources().get('GPU', 0):g} GPUs; searches in {storage}")
    figures: dict[str, list[dict]] = {s["name"]: [] for s in chosen}
    for r in range(args.rounds):
        for setting in chosen if r % 2 == 0 else chosen[::-1]:
            figures[setting["name"]].append(run_setting(args, setting, storage, f"r{r}-{setting['concurrent']}"))
    base = statistics.median(f["steps_per_hour"] for f in figures[chosen[0]["name"]])
    rows = []
    for name, found in figures.items():
        per_hour = sorted(f["steps_per_hour"] for f in found)
        rows.append({"setting": name, "steps_per_hour": statistics.median(per_hour),
                     "spread": f"{per_hour[0]:.0f}-{per_hour[-1]:.0f}",
                     "tokens_per_s": statistics.median(f["tokens_per_s"] for f in found),
                     "ratio": statistics.median(per_hour) / base,
                     "peak_gb": max(f["peak_gb"] for f in found)})
    common.output(args, rows, [("setting", "trials x resources"), ("steps_per_hour", "trial-steps/h (median)"),
                               ("spread", "min-max"), ("tokens_per_s", "real tok/s, all trials"),
                               ("ratio", f"vs {chosen[0]['name']}"), ("peak_gb", "peak GiB per trial")],
                  {**{r["setting"]: r["steps_per_hour"] for r in rows},
                   "peak_memory_gb": {r["setting"]: r["peak_gb"] for r in rows}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
