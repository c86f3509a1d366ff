"""The fine-tuning loop: plain PyTorch, no Ray.

    run = setup(spec)                       # data, model, optimizer, schedule
    fit(run, save_checkpoint, report)       # steps; at each report point: validate -> checkpoint -> report

Checkpoints (save and exact restore, also mid-epoch) are ``tune_llama.checkpoint``'s.

``training.eval_every`` sets the report points (a fraction of an epoch, or a
count of optimizer steps). A caller (the single-run CLI, the Ray trainable,
a benchmark) plugs in through the two hooks of ``fit``, or drives the pieces
itself: ``epoch_windows`` gives an epoch's optimizer steps and ``train_step``
takes one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from tune_llama.data import IGNORE_INDEX, Encoded, load_splits, make_batches
from tune_llama.data.batching import Batch, count_batches
from tune_llama.data.cache import encode_cached
from tune_llama.data.packing import DEVICE_KEYS, ONE_ROW_ATTENTION, real_tokens, with_answer_positions
from tune_llama.errors import SpecError
from tune_llama.kernels import (AUTOCAST, CompileClock, check_attention, compile_layers, compile_wanted,
                                packing_supported)
from tune_llama.loss import micro_batch_loss
from tune_llama.memory import Halving, auto_budget, examples_in
from tune_llama.model import cuda_package, load_model, load_tokenizer
from tune_llama.spec import Spec, TrainingSpec

log = logging.getLogger(__name__)

METRIC_NAMES = ("report", "step", "epoch", "lr", "examples_seen", "tokens_seen", "train_loss", "train_perplexity",
                "eval_loss", "eval_perplexity", "tokens_per_s", "train_time_s", "eval_time_s", "eval_share",
                "checkpoint_time_s", "peak_memory_gb", "compile_time_s", "tokens_per_batch", "token_budget",
                "oom_retries", "status")
DATA_COUNTS = ("train_truncated", "train_dropped", "val_truncated", "val_dropped")
"""Examples over ``data.max_length`` cut or left out (``data.overlong``): the first report carries them, so a
search's results and report show what the data policy did to each trial without a separate ``data stats``."""
Window = list[Batch]
"""The micro-batches of one optimizer step."""


@dataclass
class TrainingRun:
    """Everything one training run holds; the loop's functions take and update it."""
    spec: Spec
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module
    train_set: Encoded
    val_set: Encoded
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    steps_per_epoch: int
    report_at: list[int]
    """Optimizer steps (counted from the start of training) after which the run reports."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds each part of ``setup`` took (tokenizer, data, model, optimizer, budget probe)."""
    packing: bool = False
    """Whether micro-batches are packed padding-free (``data.packing`` where supported)."""
    one_row: bool = False
    """Whether each packed micro-batch is a single row (attention that skips masked blocks)."""
    halving: Optional[Halving] = None
    """Cuts a step's micro-batches in half when it runs out of memory (``oom_retries`` counts it)."""
    sum_across_workers: Callable[[int], int] = lambda n: n
    """Sums a count over the workers of a data-parallel trial (identity for one process), so an
    optimizer step's loss is normalised by the real tokens of the whole step across all workers."""
    step: int = 0
    """Optimizer steps taken."""
    examples_seen: int = 0
    tokens_seen: int = 0
    """Real (non-pad) tokens trained on."""
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    """One row of metrics per report."""
    best_eval_loss: float = math.inf
    best_report: Optional[int] = None
    bad_reports: int = 0
    status: str = "running"

    @property
    def epoch(self) -> float:
        """Epochs done, fractional: 1.25 is a quarter into the second epoch."""
        return self.step / self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.spec.training.epochs


# ---------------------------------------------------------------- setup

@contextlib.contextmanager
def timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def setup(spec: Spec, *, model=None, tokenizer=None, data: Optional[tuple[Encoded, Encoded]] = None) -> TrainingRun:
    """Build a run from a spec. A caller that already holds the model, tokenizer or encoded
    (train, validation) sets passes them in, so nothing is loaded twice."""
    timings: dict[str, float] = {}
    seed_everything(spec.training.seed)
    device = pick_device(spec.training.device)
    check_attention(spec, device)
    with timed(timings, "tokenizer_s"):
        tokenizer = tokenizer or load_tokenizer(spec.model)
    with timed(timings, "data_s"):
        train_set, val_set = data or encode_splits(spec, tokenizer)
    with timed(timings, "model_s"):
        if model is None:
            model = load_model(spec.model, tokenizer, device, seed=spec.training.seed)
        if compile_wanted(spec, device):
            compile_layers(model)  # compiled lazily: the first step pays, counted in compile_time_s
    packing, why_not = packing_supported(spec) if spec.data.packing else (False, "")
    if why_not:
        log.info("data.packing: padded rows instead (%s)", why_not)
    one_row = packing and spec.model.attn_implementation in ONE_ROW_ATTENTION
    if spec.data.max_tokens_per_batch == "auto":
        with timed(timings, "budget_probe_s"):
            budget = auto_budget(spec, model, tokenizer, device, packing, one_row)
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, max_tokens_per_batch=budget))
    with timed(timings, "optimizer_s"):
        n_batches = count_batches(train_set, spec.data, pack=packing)
        steps_per_epoch = max(1, math.ceil(n_batches / spec.training.gradient_accumulation_steps))
        optimizer = build_optimizer(model, spec, device)
        scheduler = build_scheduler(optimizer, spec, steps_per_epoch * spec.training.epochs)
        scaler = torch.amp.GradScaler(device.type) if spec.training.precision == "fp16" else None
    return TrainingRun(spec, device, tokenizer, model, train_set, val_set, optimizer, scheduler, scaler,
                       steps_per_epoch, report_points(spec.training, steps_per_epoch), timings, packing=packing,
                       one_row=one_row, halving=Halving(tokenizer.pad_token_id))


def encode_splits(spec: Spec, tokenizer) -> tuple[Encoded, Encoded]:
    """The spec's (train, validation) problems, encoded (from the on-disk cache when it has them)."""
    splits = load_splits(spec.data)
    return encode_cached(splits.train, tokenizer, spec.data), encode_cached(splits.val, tokenizer, spec.data)


def report_points(training: TrainingSpec, steps_per_epoch: int) -> list[int]:
    """The optimizer steps after which a run reports; the last is always the end of training."""
    total = steps_per_epoch * training.epochs
    if training.eval_every <= 1:
        # More reports than steps in an epoch land on the same steps: no need to list them.
        per_epoch = min(max(1, round(1 / training.eval_every)), steps_per_epoch)
        steps = {epoch * steps_per_epoch + math.ceil(j * steps_per_epoch / per_epoch)
                 for epoch in range(training.epochs) for j in range(1, per_epoch + 1)}
    else:
        steps = set(range(int(training.eval_every), total + 1, int(training.eval_every)))
    return sorted(s for s in steps | {total} if s > 0)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SpecError("training.device", "cuda was asked for but no GPU is visible")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model, spec: Spec, device: torch.device) -> torch.optim.Optimizer:
    t = spec.training
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                               weight_decay=t.weight_decay)
    if t.optimizer == "adamw_8bit":
        bnb = cuda_package("training.optimizer", "adamw_8bit", "bitsandbytes", device,
                           fallback="training.optimizer=adamw")
        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    fused = device.type == "cuda" and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused)


def build_scheduler(optimizer, spec: Spec, total_steps: int):
    from transformers import get_scheduler
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[spec.training.lr_schedule]
    warmup = int(spec.training.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ---------------------------------------------------------------- one step

def autocast(run: TrainingRun):
    dtype = AUTOCAST.get(run.spec.training.precision)
    return torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None)


def label_count(batch: Batch) -> int:
    """Tokens that carry loss: labels are shifted inside the model, so the first position never counts."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def epoch_windows(run: TrainingRun, epoch: int) -> list[Window]:
    """The optimizer steps of epoch ``epoch`` (0-based): the same for the same (seed, epoch), always."""
    batches = make_batches(run.train_set, run.spec.data, run.tokenizer.pad_token_id,
                           seed=run.spec.training.seed, epoch=epoch, pack=run.packing, one_row=run.one_row)
    accum = run.spec.training.gradient_accumulation_steps
    return [batches[i:i + accum] for i in range(0, len(batches), accum)]


@dataclass
class Interval:
    """What the steps since the last report trained on; the loss is summed on the device (no sync per step)."""
    loss_sum: torch.Tensor
    label_tokens: int = 0
    real_tokens: int = 0
    examples: int = 0
    seconds: float = 0.0
    """Wall time of the steps, compiling included (``validate_and_report`` takes ``compile_seconds`` out)."""
    compile_seconds: float = 0.0
    micro_batches: int = 0
    """Micro-batches run, counting the pieces of a step retried in halves."""

    @classmethod
    def start(cls, device: torch.device) -> "Interval":
        return cls(torch.zeros((), device=device))

    def mean_loss(self) -> float:
        return (self.loss_sum / max(self.label_tokens, 1)).item()


def train_step(run: TrainingRun, window: Window, interval: Optional[Interval] = None) -> Interval:
    """One optimizer step over ``window``; the loss is normalised by the real tokens of the whole step."""
    interval = interval or Interval.start(run.device)
    compiled_before = CompileClock.total()
    run.model.train()
    n_items = run.sum_across_workers(sum(label_count(b) for b in window))
    # Index of the labelled positions built here on the host, so the loss needs no device-to-host sync.
    window = [with_answer_positions(b) for b in window]
    losses: list[torch.Tensor] = []

    def run_pieces(pieces: Window) -> None:
        losses.clear()
        for batch in pieces:
            batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items() if k in DEVICE_KEYS}
            with autocast(run):
                loss = batch_loss(run, batch, n_items)
            (run.scaler.scale(loss) if run.scaler else loss).backward()
            losses.append(loss.detach().float())
        interval.micro_batches += len(pieces)

    halving = run.halving or Halving(run.tokenizer.pad_token_id, enabled=False)
    halving.run(window, run_pieces, reset=lambda: run.optimizer.zero_grad(set_to_none=True))
    for batch in window:
        real = real_tokens(batch)  # counted on the host: on the GPU it would sync
        interval.real_tokens += real
        interval.examples += examples_in(batch)
        run.tokens_seen += real
        run.examples_seen += examples_in(batch)
    interval.loss_sum += torch.stack(losses).sum() * n_items
    optimizer_step(run)
    interval.label_tokens += n_items
    interval.compile_seconds += CompileClock.total() - compiled_before
    run.step += 1
    return interval


def batch_loss(run: TrainingRun, batch: Batch, n_items: int) -> torch.Tensor:
    """The step-normalised loss of one micro-batch: answer-only logits unless the spec turns them off."""
    return micro_batch_loss(run.spec, run.model, batch, n_items)


def optimizer_step(run: TrainingRun) -> None:
    t = run.spec.training
    params = [p for p in run.model.parameters() if p.requires_grad]
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if t.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def validation_loss(run: TrainingRun, encoded: Optional[Encoded] = None) -> float:
    """Token-weighted mean loss over every example of ``encoded`` (the validation set by default)."""
    data = run.spec.data
    if data.batching == "packed":  # examples must not see each other when measured
        data = dataclasses.replace(data, batching="length_grouped")
    batches = make_batches(encoded or run.val_set, data, run.tokenizer.pad_token_id, seed=0, epoch=0,
                           shuffle=False, batch_size=data.eval_batch_size or data.batch_size, pack=run.packing,
                           one_row=run.one_row)
    run.model.eval()
    total = torch.zeros((), device=run.device)
    tokens = 0
    for batch in batches:
        n = label_count(batch)
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items() if k in DEVICE_KEYS}
        with autocast(run):
            total += batch_loss(run, batch, n).float() * n
        tokens += n
    return (total / max(tokens, 1)).item()


# ---------------------------------------------------------------- fit

SaveCheckpoint = Callable[[TrainingRun], Optional[Path]]
Report = Callable[[dict, Optional[Path]], None]


class DataParallelHooks:
    """How ``fit`` runs as one of several data-parallel workers (``tune_llama.distributed`` overrides these);
    as it stands, the single process: its own windows, nothing to combine or agree on."""

    def windows(self, run: TrainingRun, epoch: int) -> list[Window]:
        return epoch_windows(run, epoch)

    def before_step(self, run: TrainingRun, window: Window) -> None:
        pass

    def loss_sum(self, interval: Interval) -> float:
        """The interval's summed loss over all workers (a divergence check)."""
        return float(interval.loss_sum)

    def combine(self, run: TrainingRun, interval: Interval) -> None:
        """Before a report: the interval's loss, tokens and time over all workers."""

    def agree(self, run: TrainingRun) -> None:
        """After a report: one status (early stop, divergence) for every worker."""


ONE_PROCESS = DataParallelHooks()


def fit(run: TrainingRun, save_checkpoint: Optional[SaveCheckpoint] = None, report: Optional[Report] = None,
        on_step: Optional[Callable[[TrainingRun], None]] = None,
        workers: DataParallelHooks = ONE_PROCESS) -> TrainingRun:
    """Train from ``run.step`` to the end of ``training.epochs``.

    At each report point: validate, update best / early stopping, call
    ``save_checkpoint(run)`` (timed, into ``checkpoint_time_s``), then
    ``report(metrics, checkpoint_dir)``. ``on_step(run)`` follows every optimizer
    step (a progress bar). Stops on divergence or patience.
    """
    t = run.spec.training
    due = set(run.report_at)
    interval = Interval.start(run.device)
    reset_peak_memory(run.device)
    while run.step < run.total_steps and run.status == "running":
        epoch = run.step // run.steps_per_epoch
        for window in workers.windows(run, epoch)[run.step - epoch * run.steps_per_epoch:]:
            tick = time.perf_counter()
            workers.before_step(run, window)
            train_step(run, window, interval)
            diverged = run.step % t.log_every == 0 and not math.isfinite(workers.loss_sum(interval))
            if run.device.type == "cuda" and (diverged or run.step in due):
                torch.cuda.synchronize()
            interval.seconds += time.perf_counter() - tick
            if on_step is not None:
                on_step(run)
            if diverged or run.step in due:
                workers.combine(run, interval)
                validate_and_report(run, interval, diverged, save_checkpoint, report)
                workers.agree(run)
                interval = Interval.start(run.device)
                reset_peak_memory(run.device)
            if run.status != "running":
                break
    if run.status == "running":
        run.status = "completed"
    return run


def validate_and_report(run: TrainingRun, interval: Interval, diverged: bool,
                        save_checkpoint: Optional[SaveCheckpoint], report: Optional[Report]) -> dict:
    """Validate, record the report's metrics, checkpoint, and hand them to ``report``."""
    train_loss = interval.mean_loss()
    interval.seconds = max(interval.seconds - interval.compile_seconds, 0.0)
    tick = time.perf_counter()
    eval_loss = math.inf if diverged or not math.isfinite(train_loss) else validation_loss(run)
    eval_time = time.perf_counter() - tick
    run.train_time_s += interval.seconds
    run.eval_time_s += eval_time
    update_status(run, train_loss, eval_loss)
    metrics = {
        "report": len(run.history) + 1,
        "step": run.step,
        "epoch": round(run.epoch, 6),
        "lr": run.scheduler.get_last_lr()[0],  # the next step's: a trial cut at a rung shows where its schedule was
        "examples_seen": run.examples_seen,
        "tokens_seen": run.tokens_seen,
        "train_loss": finite_or_inf(train_loss),
        "train_perplexity": perplexity(train_loss),
        "eval_loss": finite_or_inf(eval_loss),
        "eval_perplexity": perplexity(eval_loss),
        "tokens_per_s": interval.real_tokens / max(interval.seconds, 1e-9),
        "train_time_s": interval.seconds,
        "eval_time_s": eval_time,
        "eval_share": run.eval_time_s / max(run.eval_time_s + run.train_time_s, 1e-9),
        "checkpoint_time_s": 0.0,
        "peak_memory_gb": peak_memory_gb(run.device),
        "compile_time_s": interval.compile_seconds,
        "tokens_per_batch": interval.real_tokens / max(interval.micro_batches, 1),
        "token_budget": (run.spec.data.max_tokens_per_batch or 0) // (run.halving.pieces if run.halving else 1),
        "oom_retries": run.halving.retries if run.halving else 0,
        "status": run.status if run.status != "running" or run.step < run.total_steps else "completed",
    }
    if not run.history:
        metrics.update({f"{split}_{kind}": getattr(data, kind, 0) for split, data in
                        (("train", run.train_set), ("val", run.val_set)) for kind in ("truncated", "dropped")})
    run.history.append(metrics)
    checkpoint = None
    if save_checkpoint is not None and run.status != "diverged":
        tick = time.perf_counter()
        checkpoint = save_checkpoint(run)
        metrics["checkpoint_time_s"] = time.perf_counter() - tick
    if report is not None:
        report(metrics, checkpoint)
    return metrics


def update_status(run: TrainingRun, train_loss: float, eval_loss: float) -> None:
    t = run.spec.training
    report = len(run.history) + 1
    if not (math.isfinite(train_loss) and math.isfinite(eval_loss)):
        run.status = "diverged"
        log.warning("training diverged at step %d (loss=%s): lower training.lr (now %g) or set "
                    "training.max_grad_norm", run.step, train_loss, t.lr)
        return
    if eval_loss < run.best_eval_loss:
        run.best_eval_loss, run.best_report, run.bad_reports = eval_loss, report, 0
        return
    run.bad_reports += 1
    if t.early_stopping_patience is not None and run.bad_reports >= t.early_stopping_patience:
        run.status = "early_stopped"


def finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def perplexity(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def reset_process_peak() -> None:
    """Start the process's CPU peak (``peak_memory_gb``'s VmHWM) afresh at the resident set it has now: a
    process that runs one trial after another (Ray's ``reuse_actors``) then reports each trial's own peak,
    not the largest of every trial it ran. Linux's ``/proc/self/clear_refs`` ``5``; elsewhere nothing."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb(device: torch.device) -> float:
    """GiB at the peak: CUDA's allocator since ``reset_peak_memory``; on CPU the process's peak resident set.

    On CPU the peak is Linux's VmHWM, which ``/proc/self/clear_refs`` can reset (the benchmarks measure one
    setting after another in one process); ``ru_maxrss`` would also keep the peaks of ended threads and of
    the process that started this one. It is the fallback where ``/proc`` has no VmHWM.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20  # kB
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
