"""How long a trial takes to reach its first optimizer step: in the loop alone, and through a real search.

    .venv/bin/python bench/startup.py            # embedded SmolLM2 + LoRA, the whole GSM8K train split
    .venv/bin/python bench/startup.py --json     # {"trial_start_s", "search_first_step_s",
                                                 #  "trial_start_overhead_s", "search_overhead_s"}
    .venv/bin/python bench/startup.py --smoke-test   # random:tiny, 64 synthetic problems: checks it runs

search_first_step_s: from launching ``python -m tune_llama.search`` on a 1-trial spec that reports after its
first optimizer step to that report showing up in the trial's result.json (polled every 50 ms), minus the
report's ``eval_time_s`` and ``checkpoint_time_s``; Ray's ``time_total_s`` splits it into before and inside
the trial function. The search is then stopped (SIGTERM); its preflight has filled the encode cache.
trial_start_s: in a fresh process, ``setup(spec)``'s timings plus the first ``train_step`` (imports apart).
On a CPU one optimizer step of the embedded model at batch 8 is itself ~10 s of compute, so the table also
splits off the start-up overhead: setup plus the first step's warm-up over a steady step.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (imports torch only when asked)


def search_first_step(spec: dict, folder: Path) -> dict:
    spec["search"] = {"num_samples": 1, "space": {"training.lr": {"choice": [spec["training"]["lr"]]}}}
    (folder / "spec.yaml").write_text(json.dumps(spec))  # JSON is YAML
    log = open(folder / "search.log", "w")
    launched = time.perf_counter()
    search = subprocess.Popen([sys.executable, "-m", "tune_llama.search", str(folder / "spec.yaml"), "--name",
                               "startup", "--storage", str(folder)], cwd=common.REPO, stdout=log, stderr=log)
    seen = None
    while seen is None and search.poll() is None:
        if any(path.read_text().strip() for path in folder.glob("startup/*/result.json")):
            seen = time.perf_counter()
        time.sleep(0.05)
    search.send_signal(signal.SIGTERM)
    search.wait(timeout=300)
    if seen is None:
        sys.exit(f"the search ended before its first report; its log: {folder / 'search.log'}")
    from tune_llama.results import load_search
    row = load_search(folder / "startup").trials[0].rows[0]
    after_step = row["eval_time_s"] + row["checkpoint_time_s"]
    return {"search_first_step_s": seen - launched - after_step,
            "before the trial function (CLI, preflight, ray.init, worker)": seen - launched - row["time_total_s"],
            "trial function to the end of its first step": row["time_total_s"] - after_step,
            "  of which the first step (train_time_s)": row["train_time_s"],
            "search start-up overhead: launch to the first step's start": seen - launched - after_step
            - row["train_time_s"],
            "after the step: eval + checkpoint (left out)": after_step}


def trial_start(args) -> None:
    """In a fresh process (``--trial``): print the figures as JSON."""
    tick = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from tune_llama.loop import setup
    imports = time.perf_counter() - tick
    run = setup(common.make_spec(args))
    first_step, _ = common.train_steps(run, 1)
    steady = min(common.train_steps(run, 1)[0] for _ in range(2))  # what a step costs once warm
    overhead = sum(run.timings.values()) + max(first_step - steady, 0.0)
    print(json.dumps({"trial_start_s": sum(run.timings.values()) + first_step,
                      **{f"  setup: {name}": s for name, s in run.timings.items()}, "  first train_step": first_step,
                      "start-up overhead: setup + the first step's warm-up (first step - steady step)": overhead,
                      "  a steady train_step (min of the next 2)": steady,
                      "imports before it (torch, transformers, tune_llama.loop; not included)": imports}))


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--val-size", type=int, default=8)
    p.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.smoke_test(args, p, **common.LOOP_SMOKE)
    if args.trial:
        return trial_start(args)
    common.start(args)
    spec = common.make_spec(args, "training.eval_every=0.0001").to_dict()  # the first report: after step 1
    folder = Path(tempfile.mkdtemp(prefix="bench-startup-")).resolve()
    common.say(f"{args.model}, {args.data}: {args.examples or 'all'} problems; the search runs in {folder}")
    figures = search_first_step(spec, folder)
    trial = subprocess.run([sys.executable, __file__, "--trial", *(sys.argv[1:] if argv is None else argv)],
                           stdout=subprocess.PIPE, check=True, text=True)
    figures.update(json.loads(trial.stdout.splitlines()[-1]))
    rows = [{"what": k, "s": v} for k, v in figures.items()]
    overheads = {"trial_start_overhead_s": "start-up overhead: setup + the first step's warm-up (first step - "
                                           "steady step)",
                 "search_overhead_s": "search start-up overhead: launch to the first step's start"}
    common.output(args, rows, [("what", "to the first optimizer step"), ("s", "s")],
                  {**{k: figures[k] for k in ("trial_start_s", "search_first_step_s")},
                   **{k: figures[name] for k, name in overheads.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
