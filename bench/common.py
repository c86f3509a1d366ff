"""What the bench scripts share: the repo on sys.path, spec building, timing, peak memory, MFU, tables.

Runs from the repository root with or without an installed package
(``PYTHONPATH=.`` on the GPU image), and imports nothing the GPU image lacks
(no ray, optuna, wandb, datasets, bitsandbytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# On a shared CPU host, OpenMP threads that spin while waiting for a descheduled peer made a step up to 10x
# slower (measured: random:tiny, 2 threads, load ~7 on 2 cores). Passive waiting measures the loops, not the
# neighbours; it must be set before torch loads OpenMP. An OMP_WAIT_POLICY already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from tune_llama.data import Encoded  # noqa: E402
from tune_llama.spec import Spec, spec_from_dict  # noqa: E402

GSM8K = REPO.parent / "shared" / "gsm8k"
H100_BF16_PEAK_FLOPS = 989e12
"""Dense bf16 peak of one H100 SXM, the MFU denominator."""
GSM8K_EPOCH_TOKENS = 1_393_000
"""Real tokens in one epoch over GSM8K's train split minus 200 validation rows (7273 problems, mean 191.6
tokens with the SmolLM2 tokenizer at max_length 512; measured with ``python -m tune_llama.data stats``)."""
CLASS_PROJECT = {"epoch_s": 65.0, "checkpoint_s": 32.0}
"""The anchor: the class project's Llama-2-7B epoch and the checkpoint written after each."""


def default_source() -> str:
    """The real GSM8K rows when they sit next to the repository, else the synthetic generator."""
    return str(GSM8K) if (GSM8K / "train.jsonl").is_file() else "synthetic"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_spec(*, model: str, source: str, examples: int, batch_size: int, max_length: int, lora: bool,
              dtype: str, precision: str, optimizer: str = "adamw", lr: float = 1e-4,
              batching: str = "length_grouped", gradient_checkpointing: bool = False, device: str = "auto",
              seed: int = 0, epochs: int = 1, val_size: int = 8, compile: bool = False,
              lora_r: int = 8) -> Spec:
    """A validated spec for a bench run: ``examples`` training problems (0: all), ``val_size`` validation ones."""
    data: dict[str, Any] = dict(source=source, train_size=examples or None, val_size=val_size,
                                max_length=max_length, batch_size=batch_size, batching=batching)
    if source == "synthetic" and examples:
        data["synthetic_size"] = examples + val_size
    return spec_from_dict({
        "model": {"name": model, "dtype": dtype, "gradient_checkpointing": gradient_checkpointing,
                  "lora": {"enabled": lora, "r": lora_r, "alpha": 2 * lora_r}},
        "data": data,
        "training": {"epochs": epochs, "lr": lr, "optimizer": optimizer, "precision": precision,
                     "device": device, "seed": seed, "log_every": 10**9, "compile": compile},
        "wandb": {"mode": "disabled"},
    })


# ---------------------------------------------------------------- examples

def subset(encoded: Encoded, n: int, start: int = 0) -> Encoded:
    """Examples ``start .. start + n`` of an encoded set (views, no copy)."""
    return Encoded(encoded.input_ids[start:start + n], encoded.labels[start:start + n])


def fixed_rows(encoded: Encoded, seq_len: int, n_rows: int) -> Encoded:
    """``n_rows`` rows of exactly ``seq_len`` real tokens cut from the concatenated examples (cycled when
    short): a clean fixed shape (batch x seq_len, no padding) for throughput and memory sweeps."""
    ids = torch.cat(encoded.input_ids)
    labels = torch.cat(encoded.labels)
    need = seq_len * n_rows
    repeat = -(-need // len(ids))
    ids, labels = ids.repeat(repeat)[:need], labels.repeat(repeat)[:need]
    return Encoded(list(ids.view(n_rows, seq_len)), list(labels.view(n_rows, seq_len)))


def real_tokens(encoded: Encoded) -> int:
    return sum(encoded.lengths)


# ---------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory inside a ``with`` block, in GiB.

    CUDA: ``max_memory_allocated`` after a reset (tensors only, not the allocator's cache).
    CPU: the process's peak resident set (VmHWM), reset on entry through /proc/self/clear_refs;
    where that reset is refused, the peak since the process started (``exact`` is then False).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.gb = float("nan")
        self.exact = True

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.exact = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gb = torch.cuda.max_memory_allocated(self.device) / 2**30
            return
        self.gb = _vm_hwm_gb() if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Timer:
    """Wall time of a ``with`` block, the device synchronised at both ends."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device
        self.s = float("nan")

    def __enter__(self) -> "Timer":
        if self.device is not None:
            sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device is not None:
            sync(self.device)
        self.s = time.perf_counter() - self._start


def base_param_count(model) -> int:
    """N in the MFU formula: parameters of the base model (LoRA adapters excluded, tied weights once)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def mfu(tokens_per_s: float, n_params: int, lora: bool, peak: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation: 6N FLOPs per token for a full fine-tune, 4N for LoRA (no weight gradients
    for the frozen base), against the bf16 peak. Counts real tokens only, so padding is not credited."""
    return tokens_per_s * (4 if lora else 6) * n_params / peak


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------- output

def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str = "") -> None:
    """A plain fixed-width table; ``columns`` are (key, header) pairs."""
    if title:
        print(f"\n{title}")
    cells = [[header for _, header in columns]] + [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(cell.rjust(w) if n and i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def write_json(path: Optional[str], name: str, payload: dict) -> None:
    """Save a bench's results (``--json``) so gpu_check.sh can print one summary."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": name, "device": device_name(), **payload}
    Path(path).write_text(json.dumps(payload, indent=1, default=str))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)


def describe_machine() -> str:
    import transformers
    load = f", load average {os.getloadavg()[0]:.1f}" if not torch.cuda.is_available() else ""
    return (f"{device_name()}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {sys.version.split()[0]}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}{load}")


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]



def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the script's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def names(p: argparse.ArgumentParser, flag: str, text: str, known) -> list[str]:
    """A comma list of names, each one of ``known`` (else a usage error naming the flag)."""
    items = [x for x in text.split(",") if x]
    unknown = [x for x in items if x not in known]
    if unknown:
        p.error(f"{flag}: unknown {unknown[0]!r} (known: {', '.join(known)})")
    return items
