"""Per-trial start-up: from a fresh process to the first training step, and where the time goes.

    .venv/bin/python bench/startup.py                 # embedded SmolLM2 + LoRA, GSM8K slice, 3 fresh processes
    .venv/bin/python bench/startup.py --runs 5 --model random:tiny

Each run is a new Python process (as a Ray trial worker is) that imports the
loop, calls ``tune_llama.loop.setup`` and runs ``train_epoch`` until its first
optimizer step. The functions ``setup`` calls are wrapped with timers by name
inside that process (the real code path, only timed), so the table splits the
time into imports, tokenizer, data load and encode, model load, peft wrap,
optimizer and schedule, and the first step.

Variants: ``cold`` imports only what a trial module imports up front (torch,
transformers, tune_llama.loop), so transformers' lazily loaded model classes
and peft land in the phase that first needs them; ``warm-imports`` imports
those first, so the other phases show their own work; ``nocache`` is ``cold``
with the encode cache bypassed (every trial tokenizes its data, as before the
cache; the first trial of a search still does). The goal (<= 5 s) is for
start-up work, ``setup`` up to the first step. ``--examples 0`` uses the whole
GSM8K train split.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before any heavy import: the child's clock starts here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def process_age_s() -> float:
    """Seconds since this process was created (interpreter start-up included), from /proc; 0 if unknown."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


# ---------------------------------------------------------------- child: one fresh process

class FirstStepDone(Exception):
    pass


def child(args) -> None:
    phases: dict[str, float] = {"interpreter start": process_age_s() - (time.perf_counter() - T0)}
    tick = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - tick
        tick = now

    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401
    mark("import torch")
    import transformers  # noqa: F401
    mark("import transformers")
    import tune_llama.loop as loop
    import tune_llama.model as model_module
    mark("import tune_llama.loop")
    if args.variant == "warm-imports":
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401
        import peft  # noqa: F401
        from peft import LoraConfig, get_peft_model  # noqa: F401
        mark("import model classes + peft")
    sys.path.insert(0, str(HERE))
    import common
    spec = common.make_spec(model=args.model, source=args.source, examples=args.examples,
                            batch_size=args.batch_size, max_length=args.max_length, lora=not args.full,
                            dtype="float32", precision="fp32", device="cpu", val_size=args.val_size)
    mark("build spec")

    timed: dict[str, float] = {}

    def timer(module, name: str, label: str) -> None:
        original = getattr(module, name)

        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                timed[label] = timed.get(label, 0.0) + time.perf_counter() - start
        setattr(module, name, wrapper)

    if args.variant == "nocache":  # the behaviour before the encode cache: every trial tokenizes again
        from tune_llama.data import encode
        loop.encode_cached = encode
    timer(loop, "load_tokenizer", "tokenizer")
    timer(loop, "load_splits", "data: load + split")
    timer(loop, "encode_cached", "data: encode")
    timer(loop, "load_model", "model load (incl. peft wrap)")
    timer(model_module, "prepare_for_training", "peft wrap")  # load_model looks it up by name
    timer(loop, "make_batches", "make_batches (setup counts batches)")
    timer(loop, "build_optimizer", "optimizer + schedule")
    timer(loop, "build_scheduler", "optimizer + schedule")

    start = time.perf_counter()
    run = loop.setup(spec)
    setup_s = time.perf_counter() - start
    tick = time.perf_counter()
    phases.update({k: v for k, v in timed.items() if k != "model load (incl. peft wrap)"})
    phases["model load"] = timed["model load (incl. peft wrap)"] - timed.get("peft wrap", 0.0)
    phases["setup: rest"] = setup_s - sum(v for k, v in timed.items() if k != "peft wrap")
    setup_done = time.perf_counter()

    # train_epoch enters autocast right before the first forward: that is where the first step begins.
    original_autocast, original_step = loop.autocast, loop.optimizer_step
    begins: list[float] = []

    def first_forward(r):
        begins.append(time.perf_counter())
        if not args.first_step:
            raise FirstStepDone
        loop.autocast = original_autocast
        return original_autocast(r)

    def first_step_then_stop(r):
        original_step(r)
        raise FirstStepDone

    loop.autocast, loop.optimizer_step = first_forward, first_step_then_stop
    try:
        loop.train_epoch(run)
    except FirstStepDone:
        pass
    phases["train_epoch: batching until the first forward"] = begins[0] - setup_done
    first_step = time.perf_counter() - begins[0] if args.first_step else None
    print(json.dumps({
        "phases": phases, "setup_s": setup_s, "first_step_s": first_step, "startup_work_s": begins[0] - start,
        "to_first_step_s": phases["interpreter start"] + (begins[0] - T0),
        "imports_s": sum(v for k, v in phases.items() if k.startswith("import")),
    }))


# ---------------------------------------------------------------- parent: runs and table

def measure(args, variant: str, quiet: bool = False) -> list[dict]:
    runs = []
    for i in range(args.runs):
        command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model", args.model,
                   "--source", args.source, "--examples", str(args.examples), "--val-size", str(args.val_size),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        command += ["--full"] * args.full + ["--first-step"] * args.first_step
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"})
        if done.returncode != 0:
            sys.exit(f"startup child failed ({variant}):\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["process_wall_s"] = time.perf_counter() - started
        runs.append(result)
        if quiet:
            continue
        print(f"  {variant} run {i + 1}: start-up work {result['startup_work_s']:.2f} s, imports "
              f"{result['imports_s']:.2f} s, process start -> first step begins {result['to_first_step_s']:.2f} s"
              + (f", first step {result['first_step_s']:.2f} s" if result["first_step_s"] else ""), flush=True)
    return runs


def median(runs: list[dict], get) -> float:
    values = [get(r) for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],  # not common.parser: common imports torch
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    gsm8k = REPO.parent / "shared" / "gsm8k"
    p.add_argument("--model", default="embedded:smollm2")
    p.add_argument("--source", default=str(gsm8k) if (gsm8k / "train.jsonl").is_file() else "synthetic")
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--val-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    p.add_argument("--first-step", action="store_true",
                   help="also run the first step (forward, backward, optimizer) and time it")
    p.add_argument("--runs", type=int, default=2, help="fresh processes per variant (the median is printed)")
    p.add_argument("--variants", default="nocache,cold,warm-imports",
                   help="nocache: encode every time (as before the cache); cold: cached encode, lazy imports "
                        "where first needed; warm-imports: transformers model classes and peft imported first")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=["nocache", "cold", "warm-imports"], dest="variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        child(args)
        return 0

    sys.path.insert(0, str(HERE))
    import common
    print(f"machine: {common.describe_machine()}")
    print(f"{args.model} ({'full' if args.full else 'LoRA'}), data {args.source}: {args.examples or 'all'} train + "
          f"{args.val_size} val examples, batch {args.batch_size}; {args.runs} fresh process(es) per variant",
          flush=True)
    variants = [v for v in args.variants.split(",") if v]
    if any(v != "nocache" for v in variants):
        print("  priming the encode cache (one untimed run: the first trial of a search pays the encode)", flush=True)
        measure(argparse.Namespace(**{**vars(args), "runs": 1}), "cold", quiet=True)
    results = {v: measure(args, v) for v in variants}
    names = list(dict.fromkeys(k for runs in results.values() for r in runs for k in r["phases"]))
    rows = [{"phase": name, **{v: median(runs, lambda r, n=name: r["phases"].get(n)) for v, runs in results.items()}}
            for name in names]
    summary = [("start-up work: setup() + batching to the first forward (goal <= 5 s)", "startup_work_s"),
               ("  of which setup()", "setup_s"), ("imports", "imports_s"),
               ("process start -> first step begins", "to_first_step_s"),
               ("first step (fwd + bwd + optimizer; --first-step)", "first_step_s"),
               ("process wall (incl. exit)", "process_wall_s")]
    rows += [{"phase": label, **{v: median(runs, lambda r, k=key: r[k]) for v, runs in results.items()}}
             for label, key in summary]
    common.print_table(rows, [("phase", "phase (median s)")] + [(v, v) for v in results],
                       title="start-up of one trial, fresh process")
    print("nocache: encodes the data in every trial (before the cache); cold: the encode cache is warm, lazy "
          "transformers/peft imports fall into the phase that first needs them; warm-imports: those imported first.")
    common.write_json(args.json, "startup", {"rows": rows, "runs": results, "setting": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
