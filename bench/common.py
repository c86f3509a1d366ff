"""What the bench scripts share: the repo on sys.path, the data default, bench specs, timed steps, output.

Imports nothing the GPU image lacks (no ray, optuna, wandb, datasets, bitsandbytes), and torch only inside
functions (``startup.py`` times the imports). Progress goes to stderr; stdout gets a table, or one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
GSM8K = REPO.parent / "shared" / "gsm8k"
"""The one place bench/ looks for the real GSM8K rows (read-only); ``--data`` points elsewhere."""

# On a shared CPU host, OpenMP threads that spin while a descheduled peer runs made a step up to 10x slower
# (random:tiny, 2 threads, load ~7 on 2 cores). Passive waiting measures the loops, not the neighbours;
# it must be set before torch loads OpenMP. An OMP_WAIT_POLICY already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# ---------------------------------------------------------------- --smoke-test, the one quick-run flag

SMOKE_HELP = ("a quick run on random:tiny and synthetic data, on CPU in a minute or two: checks that the bench "
              "works end to end; not a measurement")
LOOP_SMOKE = {"model": "random:tiny", "data": "synthetic", "examples": 64, "batch_size": 4}
"""The smoke sizes of the loop-level benches (``parser``'s options)."""


def add_smoke_test(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke-test", action="store_true", help=SMOKE_HELP)


def smoke_test(args, p: argparse.ArgumentParser, **values) -> None:
    """With ``--smoke-test``, each option of ``values`` still at its default takes the smoke value; an option
    given on the command line keeps its own."""
    if not args.smoke_test:
        return
    for name, value in values.items():
        if getattr(args, name) == p.get_default(name):
            setattr(args, name, value)


def parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """The options every loop-level bench takes; ``defaults`` override the per-script defaults."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    gsm8k = str(GSM8K) if (GSM8K / "train.jsonl").is_file() else "synthetic"
    p.add_argument("--model", default="embedded:smollm2", help="model.name (default %(default)s)")
    p.add_argument("--data", default=gsm8k, help="data.source: a GSM8K folder or synthetic (default %(default)s)")
    p.add_argument("--examples", type=int, default=0, help="training problems, 0 = all (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA r=8")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any spec field, e.g. --set data.max_tokens_per_batch=2048 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_smoke_test(p)
    p.set_defaults(**defaults)
    return p


def make_spec(args, *overrides: str):
    """The spec of a bench run: ``args`` (see ``parser``), then ``--set``, then ``overrides``.
    On CUDA the weights are bf16 with bf16 autocast; on CPU fp32."""
    from tune_llama.spec import spec_from_dict
    on_gpu = cuda()
    data = {"source": args.data, "train_size": args.examples or None, "val_size": getattr(args, "val_size", 8),
            "max_length": args.max_length, "batch_size": args.batch_size}
    if args.data == "synthetic" and args.examples:
        data["synthetic_size"] = args.examples + data["val_size"]
    return spec_from_dict({
        "model": {"name": args.model, "dtype": "bfloat16" if on_gpu else "float32", "lora": {"enabled": not args.full}},
        "data": data,
        "training": {"epochs": 1, "precision": "bf16" if on_gpu else "fp32", "log_every": 10**9},
        "wandb": {"mode": "disabled"},
    }, [*args.overrides, *overrides])


def start(args) -> None:
    """The machine line (stderr). Torch's CPU threads: ``args.threads`` where a script has it, else
    OMP_NUM_THREADS, else torch's choice."""
    import torch
    import transformers
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(0) if cuda() else \
        f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()}), load average {os.getloadavg()[0]:.1f}"
    say(f"machine: {where}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {sys.version.split()[0]}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


# ---------------------------------------------------------------- measuring

def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(run, n: int):
    """The run's next ``n`` optimizer steps, in its own epoch order (``epoch_windows`` + ``train_step``):
    (seconds, Interval), the device synchronised at both ends, batching done before the clock starts."""
    from tune_llama.loop import epoch_windows, train_step
    first = run.step // run.steps_per_epoch
    epochs = range(first, (run.step + n - 1) // run.steps_per_epoch + 1)
    windows = [w for e in epochs for w in epoch_windows(run, e)][run.step - first * run.steps_per_epoch:][:n]
    sync(run.device)
    start, interval = time.perf_counter(), None
    for window in windows:
        interval = train_step(run, window, interval)
    sync(run.device)
    return time.perf_counter() - start, interval


def free_memory(device=None) -> None:
    """Collect garbage; with ``device``, reset the peak ``tune_llama.loop.peak_memory_gb`` reads: CUDA
    max_memory_allocated, or on CPU the process's peak RSS (VmHWM), where Linux lets /proc/self/clear_refs
    reset it."""
    import gc
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device is not None:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def is_oom(err: BaseException) -> bool:
    import torch
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------- output

def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def fmt(value) -> str:
    if value is None or value != value:  # None or nan
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def output(args, rows: list[dict], columns: list[tuple[str, str]], payload: dict, notes: str = "") -> None:
    """With --json: ``payload`` as one JSON object on stdout. Else a fixed-width table of ``rows``
    (``columns`` are (key, header) pairs) and the notes."""
    if args.json:
        print(json.dumps(payload, default=str))
        return
    cells = [[h for _, h in columns]] + [[fmt(row.get(k)) for k, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if notes:
        print(notes)
