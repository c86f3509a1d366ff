"""Checkpoint cost as a share of an epoch, LoRA and full fine-tune.

    .venv/bin/python bench/checkpoint.py                    # CPU: SmolLM2-135M, the whole GSM8K train split
    python3 bench/checkpoint.py --model random:llama-2-7b --data synthetic --epoch-tokens 1393000   # GPU
    .venv/bin/python bench/checkpoint.py --smoke-test       # random:tiny, 2 steps: checks it runs

Per mode: ``setup``, warmup steps (the optimizer state a checkpoint carries), ``--steps`` timed steps for
real tokens/s, then ``save_state`` into a temporary folder, timed. Epoch = the run's train split (or
``--epoch-tokens``) at the measured rate. Ray's persist copy is not included. The class project: 32 s / 65 s.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)


def measure(args, full: bool) -> dict:
    from tune_llama.checkpoint import save_state
    from tune_llama.loop import setup
    args.full = full
    run = setup(common.make_spec(args, *([f"training.optimizer={args.full_optimizer}"] if full else [])))
    common.train_steps(run, args.warmup_steps)
    seconds, interval = common.train_steps(run, args.steps)
    tokens_per_s = interval.real_tokens / seconds
    epoch_s = (args.epoch_tokens or sum(run.train_set.lengths)) / tokens_per_s
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as folder:
        start = time.perf_counter()
        save_state(run, Path(folder))
        save_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return dict(mode=f"full ({run.spec.training.optimizer})" if full else "LoRA", save_s=save_s, mib=size / 2**20,
                tokens_per_s=tokens_per_s, epoch_s=epoch_s, share_pct=100 * save_s / epoch_s,
                of_65s_pct=100 * save_s / 65)


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps for tokens/s")
    p.add_argument("--epoch-tokens", type=int, help="real tokens of the epoch to compare with (default: the run's)")
    p.add_argument("--full-optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="sgd: weights only, for a small disk (a 7B AdamW checkpoint is ~40 GB)")
    args = p.parse_args(argv)
    common.smoke_test(args, p, **common.LOOP_SMOKE, steps=2)
    common.start(args)
    rows = []
    for mode in args.modes.split(","):
        rows.append(measure(args, full=mode == "full"))
        common.say("  " + "  ".join(f"{k} {common.fmt(v)}" for k, v in rows[-1].items()))
        common.free_memory()
    common.output(args, rows, [("mode", "mode"), ("save_s", "save_state s"), ("mib", "MiB"),
                               ("tokens_per_s", "real tok/s"), ("epoch_s", "epoch s"), ("share_pct", "share %"),
                               ("of_65s_pct", "% of 65 s")],
                  {row["mode"]: row for row in rows},
                  "share = save_state / epoch (goal for LoRA: <= 2%); % of 65 s: against the class project's "
                  "epoch, whose checkpoint took 32 s (49%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
