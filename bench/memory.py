"""The largest batch that fits in GPU memory at seq ``--max-length``, per mode, gradient checkpointing off/on.

    python3 bench/memory.py --model random:llama-2-7b                    # GPU (bf16 there)
    .venv/bin/python bench/memory.py --smoke-test     # the code path on CPU: random:tiny, up to batch 4

Modes: full fine-tune with SGD and with AdamW (pure bf16 on CUDA), LoRA. Each try is one ``train_step`` on
batch x seq random tokens; the batch doubles from 1 until CUDA runs out of memory, then bisects. ``>=``: a
lower bound (``--max-batch`` or ``--budget-s`` reached).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

MODES = {"full-sgd": ["model.lora.enabled=false", "training.optimizer=sgd"],
         "full-adamw": ["model.lora.enabled=false", "training.optimizer=adamw"],
         "lora": ["model.lora.enabled=true", "training.optimizer=adamw"]}


def largest(args, mode: str, checkpointing: bool) -> dict:
    import torch
    from tune_llama.data import Encoded
    from tune_llama.loop import peak_memory_gb, setup
    from tune_llama.model import load_tokenizer
    overrides = [*MODES[mode], f"model.gradient_checkpointing={checkpointing}"]
    tokenizer = load_tokenizer(common.make_spec(args).model)
    ids = list(torch.randint(0, len(tokenizer), (args.max_batch, args.max_length)))

    def data(batch: int):
        return Encoded(ids[:batch], ids[:batch]), Encoded(ids[:1], ids[:1])
    model = setup(common.make_spec(args, *overrides), tokenizer=tokenizer, data=data(1)).model
    found = dict(mode=mode, grad_ckpt="on" if checkpointing else "off", fits=0, exact=False)
    started = time.perf_counter()

    def fits(batch: int) -> bool:
        run = setup(common.make_spec(args, *overrides, f"data.batch_size={batch}"), model=model,
                    tokenizer=tokenizer, data=data(batch))
        common.free_memory(run.device)
        try:
            seconds, _ = common.train_steps(run, 1)
            found.update(fits=batch, peak_gb=peak_memory_gb(run.device), step_s=seconds)
        except Exception as err:  # torch.OutOfMemoryError, or a CUDA error that says out of memory
            if not common.is_oom(err):
                raise
        model.zero_grad(set_to_none=True)
        del run
        common.free_memory()  # outside the except block: the traceback no longer pins the activations
        common.say(f"  {mode}, grad ckpt {found['grad_ckpt']}: batch {batch} "
                   + ("fits" if found["fits"] == batch else "OOM"))
        return found["fits"] == batch

    low, high = 0, None
    while high is None and low < args.max_batch and time.perf_counter() - started < args.budget_s:
        batch = min(max(1, 2 * low), args.max_batch)
        low, high = (batch, None) if fits(batch) else (low, batch)
    while high is not None and high - low > max(1, low // 8) and time.perf_counter() - started < args.budget_s:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    found.update(exact=high is not None and high - low <= max(1, low // 8), seconds=time.perf_counter() - started)
    found["max_batch"] = f"{'' if found['exact'] else '>='}{low}"
    return found


def main(argv=None) -> int:
    p = common.parser(__doc__, model="random:llama-2-7b", data="synthetic")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to try")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--budget-s", type=float, default=20.0, help="seconds of search per mode and setting")
    args = p.parse_args(argv)
    # On CPU nothing runs out of memory: the smoke test stops at a small --max-batch.
    common.smoke_test(args, p, **{**common.LOOP_SMOKE, "max_batch": 4, "max_length": 64})
    if not common.cuda() and not args.smoke_test:
        print("no CUDA device here, and host RAM has no limit to find: run bench/memory.py on a GPU "
              "(bench/gpu_check.sh), or check its code path with --smoke-test")
        return 0
    common.start(args)
    rows = [largest(args, mode, ckpt == "on")
            for mode in args.modes.split(",") for ckpt in args.checkpointing.split(",")]
    common.output(args, rows, [("mode", "mode"), ("grad_ckpt", "grad ckpt"), ("max_batch", "max batch"),
                               ("peak_gb", "GiB at max"), ("step_s", "s/step at max"), ("seconds", "search s")],
                  {f"{r['mode']}/{r['grad_ckpt']}": r for r in rows},
                  f"seq {args.max_length}; >= : a lower bound (--max-batch or --budget-s reached); GiB = "
                  + ("CUDA max_memory_allocated" if common.cuda() else "process peak RSS"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
