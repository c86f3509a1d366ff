"""The largest batch that fits at seq 512 on a 7B shape, per training mode, with and without gradient checkpointing.

    python3 bench/memory.py                 # GPU: random:llama-2-7b, bf16
    .venv/bin/python bench/memory.py        # CPU: explains and exits 0
    .venv/bin/python bench/memory.py --cpu-smoke --model random:tiny --max-batch 4   # code path check on CPU

Modes: full fine-tune with SGD, AdamW and 8-bit AdamW; LoRA; QLoRA (4-bit base).
Each try is one real training step of our loop (forward, backward, optimizer
step) on ``batch x seq`` rows with no padding. The batch doubles from 1 until
CUDA runs out of memory (``torch.OutOfMemoryError`` caught, memory freed), then
bisects between the last fit and the first OOM. A mode that has used up its
time (``--mode-budget-s``) or reached ``--max-batch`` reports what fitted so far
as a lower bound (``>=``). Modes that need bitsandbytes print
``skipped: bitsandbytes not installed`` when it is missing.

Full fine-tunes train the bf16 weights directly (pure bf16: AdamW's two moments
are bf16 too, so a 7B full fine-tune needs ~54 GB before activations).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)
from common import PeakMemory, Timer, free_memory, is_oom  # noqa: E402

import torch  # noqa: E402

MODES = {  # name: (lora, quantization, optimizer)
    "full-sgd": (False, "none", "sgd"),
    "full-adamw": (False, "none", "adamw"),
    "full-adamw8bit": (False, "none", "adamw_8bit"),
    "lora": (True, "none", "adamw"),
    "qlora": (True, "4bit", "adamw"),
}


def needs_bnb(mode: str) -> bool:
    _, quantization, optimizer = MODES[mode]
    return quantization != "none" or optimizer == "adamw_8bit"


def set_checkpointing(model, on: bool) -> None:
    """Toggle gradient checkpointing on a built model (what model.gradient_checkpointing does at load)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "get_base_model"):
            base.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    else:
        base.gradient_checkpointing_disable()


class Search:
    """Doubling, then bisection, on one run; each try is one real step of our loop."""

    def __init__(self, run, rows, args, device):
        self.run, self.rows, self.args, self.device = run, rows, args, device
        self.peaks: dict[int, float] = {}
        self.step_s: dict[int, float] = {}
        self.started = time.perf_counter()
        self.cut = ""

    def fits(self, batch: int) -> bool:
        from tune_llama.loop import train_epoch
        run = self.run
        run.spec = dataclasses.replace(run.spec, data=dataclasses.replace(run.spec.data, batch_size=batch))
        run.train_set = common.subset(self.rows, batch)
        ok = True
        try:
            with PeakMemory(self.device) as peak, Timer(self.device) as timer:
                train_epoch(run)
            self.peaks[batch], self.step_s[batch] = peak.gb, timer.s
        except Exception as err:  # torch.OutOfMemoryError, or a CUDA error that says out of memory
            if not is_oom(err):
                raise
            ok = False
        run.optimizer.zero_grad(set_to_none=True)
        free_memory()  # outside the except block: the traceback no longer pins the activations
        print(f"    batch {batch}: {'fits' if ok else 'OOM'}"
              + (f" ({self.peaks[batch]:.1f} GiB, {self.step_s[batch]:.1f} s)" if ok else ""), flush=True)
        return ok

    def affordable(self, batch: int) -> bool:
        """Whether a try at ``batch`` should finish inside the mode's time budget (step time ~ batch)."""
        spent = time.perf_counter() - self.started
        known = [b for b in self.step_s if b <= batch]
        estimate = self.step_s[max(known)] * batch / max(known) if known else 0.0
        if spent + estimate > self.args.mode_budget_s:
            self.cut = f"search cut at {self.args.mode_budget_s:.0f} s"
            return False
        return True

    def largest(self) -> tuple[int, bool]:
        """(largest batch that fitted, exact?); 0 when not even batch 1 fits."""
        lo, hi = 0, None
        batch = 1
        while batch <= self.args.max_batch:
            if lo and not self.affordable(batch):
                return lo, False
            if not self.fits(batch):
                hi = batch
                break
            lo = batch
            batch *= 2
        if hi is None:
            self.cut = f"cap --max-batch {self.args.max_batch}"
            return lo, False
        while lo and hi - lo > max(1, int(lo * self.args.resolution)):
            mid = (lo + hi) // 2
            if not self.affordable(mid):
                return lo, False
            if self.fits(mid):
                lo = mid
            else:
                hi = mid
        return lo, True


def search_mode(mode: str, checkpointing: bool, model, tokenizer, base_spec, rows, args, device) -> dict:
    from tune_llama.loop import setup
    lora, quantization, optimizer = MODES[mode]
    spec = dataclasses.replace(
        base_spec,
        model=dataclasses.replace(base_spec.model, gradient_checkpointing=checkpointing, quantization=quantization,
                                  lora=dataclasses.replace(base_spec.model.lora, enabled=lora)),
        training=dataclasses.replace(base_spec.training, optimizer=optimizer))
    set_checkpointing(model, checkpointing)
    row = dict(mode=mode, grad_ckpt="on" if checkpointing else "off")
    print(f"  {mode}, gradient checkpointing {row['grad_ckpt']}:", flush=True)
    run = setup(spec, model=model, tokenizer=tokenizer)
    try:
        search = Search(run, rows, args, device)
        best, exact = search.largest()
        row.update(max_batch=best if exact else f">={best}", peak_gb_at_max=search.peaks.get(best),
                   peak_gb_at_1=search.peaks.get(1), step_s_at_max=search.step_s.get(best),
                   tokens_at_max=best * args.seq, note=search.cut,
                   seconds=time.perf_counter() - search.started)
    finally:
        run.optimizer.state.clear()
        del run
        model.zero_grad(set_to_none=True)
        free_memory()
    return row


def qlora_model(base_spec, tokenizer, device):
    """A 4-bit base for QLoRA: the random base saved once and reloaded quantized (random shapes have no hub id)."""
    from tune_llama.model import load_model
    folder = Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    plain = load_model(dataclasses.replace(base_spec.model, lora=dataclasses.replace(base_spec.model.lora,
                                                                                      enabled=False)),
                       tokenizer, device)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del plain
    free_memory()
    spec = dataclasses.replace(base_spec.model, name=str(folder), tokenizer=None, quantization="4bit",
                               lora=dataclasses.replace(base_spec.model.lora, enabled=True))
    return load_model(spec, tokenizer, device)


def run_searches(args, device: torch.device) -> list[dict]:
    from tune_llama.data import encode, load_splits
    from tune_llama.model import load_model, load_tokenizer, prepare_for_training

    base_spec = common.make_spec(model=args.model, source=args.source, examples=args.examples, batch_size=1,
                                 max_length=args.seq, lora=False, dtype=args.dtype, precision=args.precision,
                                 device=device.type)
    tokenizer = load_tokenizer(base_spec.model)
    rows = common.fixed_rows(encode(load_splits(base_spec.data).train, tokenizer, base_spec.data), args.seq,
                             args.max_batch)
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    results: list[dict] = []

    def record(row: dict) -> None:  # written after every mode: a stage cut off by its timeout keeps what it found
        results.append(row)
        common.write_json(args.json, "memory", {"memory": results, "setting": vars(args)})
    with Timer(device) as build:
        model = load_model(base_spec.model, tokenizer, device)
    print(f"{args.model} built in {build.s:.1f} s; seq {args.seq}, batch doubling from 1 up to {args.max_batch}, "
          f"{args.mode_budget_s:.0f} s per mode at most", flush=True)
    # Full fine-tunes first on the plain model; LoRA then wraps that same base in place.
    for mode in args.modes:
        if needs_bnb(mode) and not have_bnb:
            record(dict(mode=mode, grad_ckpt="-", max_batch=None, note="skipped: bitsandbytes not installed"))
            print(f"  {mode}: skipped: bitsandbytes not installed", flush=True)
            continue
        if mode == "qlora":
            continue  # needs its own quantized model: run last, below
        if MODES[mode][0] and not hasattr(model, "get_base_model"):
            model = prepare_for_training(model, dataclasses.replace(
                base_spec.model, lora=dataclasses.replace(base_spec.model.lora, enabled=True)))
        for checkpointing in args.checkpointing:
            record(guarded(mode, checkpointing, model, tokenizer, base_spec, rows, args, device))
    if "qlora" in args.modes and have_bnb:
        del model
        free_memory()
        if device.type != "cuda":
            record(dict(mode="qlora", grad_ckpt="-", note="skipped: 4-bit needs CUDA"))
        else:
            model = qlora_model(base_spec, tokenizer, device)
            for checkpointing in args.checkpointing:
                record(guarded("qlora", checkpointing, model, tokenizer, base_spec, rows, args, device))
    return results


def guarded(mode, checkpointing, model, tokenizer, base_spec, rows, args, device) -> dict:
    try:
        return search_mode(mode, checkpointing, model, tokenizer, base_spec, rows, args, device)
    except Exception as err:
        if not is_oom(err):
            raise
        free_memory()
        return dict(mode=mode, grad_ckpt="on" if checkpointing else "off", max_batch=0, note="OOM while setting up")


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--model", default="random:llama-2-7b")
    p.add_argument("--source", default="synthetic", help="rows are cut from these examples (content is irrelevant)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to try")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--resolution", type=float, default=0.25,
                   help="stop bisecting when the gap is below this share of the fitting batch")
    p.add_argument("--mode-budget-s", type=float, default=18.0, help="seconds of search per mode and setting")
    p.add_argument("--cpu-smoke", action="store_true", help="run the search on CPU (no OOM there: stops at the cap)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.modes = common.names(p, "--modes", args.modes, MODES)
    args.modes.sort(key=lambda m: (MODES[m][0], m))  # full fine-tunes before LoRA wraps the base
    settings = {"off": False, "on": True}
    args.checkpointing = [settings[s] for s in common.names(p, "--checkpointing", args.checkpointing, settings)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench/memory.py measures the largest batch that fits in GPU memory (7B shape, seq 512); this machine "
              "has no CUDA device, and host RAM has no device-memory limit to find.\n"
              "Run it on a GPU (bench/gpu_check.sh), or check the code path with --cpu-smoke --model random:tiny.")
        return 0
    device = torch.device(common.default_device())
    print(f"machine: {common.describe_machine()}", flush=True)
    results = run_searches(args, device)
    common.print_table(results, [
        ("mode", "mode"), ("grad_ckpt", "grad ckpt"), ("max_batch", "max batch"), ("tokens_at_max", "tokens/step"),
        ("peak_gb_at_1", "GiB @1"), ("peak_gb_at_max", "GiB @max"), ("step_s_at_max", "s/step @max"),
        ("note", "note")],
        title=f"largest batch at seq {args.seq}, {args.model} ({common.device_name()})")
    print("max batch = how far past batch 1 each mode goes (>= : lower bound, search cut); GiB = "
          + ("CUDA max_memory_allocated in that step" if device.type == "cuda" else "process peak RSS (CPU smoke)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
