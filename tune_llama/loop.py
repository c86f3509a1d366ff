"""The fine-tuning loop: plain PyTorch, no Ray.

    run = setup(spec)                       # data, model, optimizer, schedule
    fit(run, save_checkpoint, report)       # epochs: train -> evaluate -> checkpoint -> report
    save_state(run, dir) / load_state(run, dir)   # exact resume

A caller (the single-run CLI, the Ray trainable) plugs in through the two
epoch-end hooks of ``fit``.
"""

from __future__ import annotations

import dataclasses
import json
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tune_llama.data import Encoded, load_splits, make_batches
from tune_llama.data.cache import encode_cached
from tune_llama.model import load_model, load_tokenizer, load_trainable_state, trainable_state
from tune_llama.spec import Spec, SpecError

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
METRIC_NAMES = ("epoch", "train_loss", "train_perplexity", "eval_loss", "eval_perplexity", "tokens_per_s",
                "epoch_time_s", "checkpoint_time_s", "peak_memory_gb", "status")


@dataclass
class Run:
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
    epoch: int = 0
    """Epochs completed."""
    history: list[dict] = field(default_factory=list)
    best_eval_loss: float = math.inf
    best_epoch: Optional[int] = None
    bad_epochs: int = 0
    status: str = "running"


# ---------------------------------------------------------------- setup

def setup(spec: Spec, model=None, tokenizer=None) -> Run:
    """Build a run from a spec. ``model``/``tokenizer`` may be passed in to avoid loading twice."""
    seed_everything(spec.training.seed)
    device = pick_device(spec.training.device)
    tokenizer = tokenizer or load_tokenizer(spec.model)
    splits = load_splits(spec.data)
    train_set = encode_cached(splits.train, tokenizer, spec.data)  # each trial of a search encodes the same data
    val_set = encode_cached(splits.val, tokenizer, spec.data)
    if model is None:
        model = load_model(spec.model, tokenizer, device, seed=spec.training.seed)
    if spec.training.compile:
        model = torch.compile(model)
    n_batches = len(make_batches(train_set, spec.data, tokenizer.pad_token_id, seed=spec.training.seed, epoch=0))
    steps_per_epoch = math.ceil(n_batches / spec.training.gradient_accumulation_steps)
    optimizer = build_optimizer(model, spec, device)
    scheduler = build_scheduler(optimizer, spec, steps_per_epoch * spec.training.epochs)
    scaler = torch.amp.GradScaler(device.type) if spec.training.precision == "fp16" else None
    return Run(spec, device, tokenizer, model, train_set, val_set, optimizer, scheduler, scaler, steps_per_epoch)


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
        if device.type != "cuda":
            raise SpecError("training.optimizer", "adamw_8bit needs bitsandbytes and CUDA; use adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SpecError("training.optimizer", "adamw_8bit needs bitsandbytes: pip install 'tune-llama[quant]'") \
                from None
        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    fused = device.type == "cuda" and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused)


def build_scheduler(optimizer, spec: Spec, total_steps: int):
    from transformers import get_scheduler
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[spec.training.lr_schedule]
    warmup = int(spec.training.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ---------------------------------------------------------------- train / evaluate

def autocast(run: Run):
    dtype = AUTOCAST.get(run.spec.training.precision)
    return torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None)


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels are shifted inside the model, so the first position never counts."""
    return int((batch["labels"][:, 1:] != -100).sum())


def train_epoch(run: Run) -> dict[str, float]:
    """One pass over the training data. Returns train loss, real tokens/s and a divergence flag."""
    t, model = run.spec.training, run.model
    batches = make_batches(run.train_set, run.spec.data, run.tokenizer.pad_token_id,
                           seed=t.seed, epoch=run.epoch)
    accum = t.gradient_accumulation_steps
    windows = [batches[i:i + accum] for i in range(0, len(batches), accum)]
    model.train()
    loss_sum = torch.zeros((), device=run.device)  # summed on device: no sync per step
    loss_tokens = real_tokens = 0
    diverged = False
    start = time.perf_counter()
    bar = tqdm(windows, desc=f"epoch {run.epoch + 1}", unit="step", leave=False, disable=None)
    for step, window in enumerate(bar, 1):
        n_items = sum(label_count(b) for b in window)  # normalise by the real tokens of the whole step
        for batch in window:
            real_tokens += int(batch["attention_mask"].sum())  # counted on the host: on the GPU it would sync
            batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
            with autocast(run):
                loss = model(**batch, num_items_in_batch=n_items).loss
            (run.scaler.scale(loss) if run.scaler else loss).backward()
            loss_sum += loss.detach().float() * n_items
        optimizer_step(run)
        loss_tokens += n_items
        if step % t.log_every == 0 or step == len(windows):
            mean = (loss_sum / max(loss_tokens, 1)).item()
            if not math.isfinite(mean):
                diverged = True
                break
            bar.set_postfix(loss=f"{mean:.4f}", tok_s=f"{real_tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    train_loss = (loss_sum / max(loss_tokens, 1)).item()
    return {"train_loss": train_loss, "tokens_per_s": real_tokens / elapsed, "train_time_s": elapsed,
            "diverged": diverged or not math.isfinite(train_loss)}


def optimizer_step(run: Run) -> None:
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
def evaluate(run: Run, encoded: Optional[Encoded] = None) -> float:
    """Token-weighted mean loss over every example of ``encoded`` (the validation set by default)."""
    data = run.spec.data
    if data.batching == "packed":  # examples must not see each other when measured
        data = dataclasses.replace(data, batching="length_grouped")
    batches = make_batches(encoded or run.val_set, data, run.tokenizer.pad_token_id, seed=0, epoch=0,
                           shuffle=False, batch_size=data.eval_batch_size or data.batch_size)
    run.model.eval()
    total = torch.zeros((), device=run.device)
    tokens = 0
    for batch in batches:
        n = label_count(batch)
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        with autocast(run):
            total += run.model(**batch, num_items_in_batch=n).loss.float() * n
        tokens += n
    return (total / max(tokens, 1)).item()


# ---------------------------------------------------------------- fit

SaveCheckpoint = Callable[[Run], Optional[Path]]
Report = Callable[[dict, Optional[Path]], None]


def fit(run: Run, save_checkpoint: Optional[SaveCheckpoint] = None, report: Optional[Report] = None) -> Run:
    """Train from ``run.epoch`` to ``training.epochs``.

    After each epoch: evaluate, update best / early stopping, call
    ``save_checkpoint(run)`` (timed, into ``checkpoint_time_s``), then
    ``report(metrics, checkpoint_dir)``. Stops on divergence or patience.
    """
    t = run.spec.training
    while run.epoch < t.epochs and run.status == "running":
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        start = time.perf_counter()
        train = train_epoch(run)
        eval_loss = math.inf if train["diverged"] else evaluate(run)
        run.epoch += 1
        update_status(run, train["train_loss"], eval_loss)
        metrics = {
            "epoch": run.epoch,
            "train_loss": finite_or_inf(train["train_loss"]),
            "train_perplexity": perplexity(train["train_loss"]),
            "eval_loss": finite_or_inf(eval_loss),
            "eval_perplexity": perplexity(eval_loss),
            "tokens_per_s": train["tokens_per_s"],
            "epoch_time_s": time.perf_counter() - start,
            "checkpoint_time_s": 0.0,
            "peak_memory_gb": peak_memory_gb(run.device),
            "status": run.status if run.status != "running" or run.epoch < t.epochs else "completed",
        }
        run.history.append(metrics)
        checkpoint = None
        if save_checkpoint is not None and run.status != "diverged":
            tick = time.perf_counter()
            checkpoint = save_checkpoint(run)
            metrics["checkpoint_time_s"] = time.perf_counter() - tick
        if report is not None:
            report(metrics, checkpoint)
    if run.status == "running":
        run.status = "completed"
    return run


def update_status(run: Run, train_loss: float, eval_loss: float) -> None:
    t = run.spec.training
    if not (math.isfinite(train_loss) and math.isfinite(eval_loss)):
        run.status = "diverged"
        log.warning("training diverged in epoch %d (loss=%s): lower training.lr (now %g) or set "
                    "training.max_grad_norm", run.epoch, train_loss, t.lr)
        return
    if eval_loss < run.best_eval_loss:
        run.best_eval_loss, run.best_epoch, run.bad_epochs = eval_loss, run.epoch, 0
        return
    run.bad_epochs += 1
    if t.early_stopping_patience is not None and run.bad_epochs >= t.early_stopping_patience:
        run.status = "early_stopped"


def finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def perplexity(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------- state

TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.pt", "state.pt"


def save_state(run: Run, directory: Path) -> Path:
    """Trainable weights (the adapter alone for LoRA), optimizer, schedule, scaler, RNG and progress."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous().cpu() for k, v in trainable_state(run.model).items()}
    save_file(weights, directory / TRAINABLE)
    torch.save(run.optimizer.state_dict(), directory / OPTIMIZER)
    torch.save({
        "epoch": run.epoch, "history": run.history, "status": run.status,
        "best_eval_loss": run.best_eval_loss, "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs,
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, directory / STATE)
    (directory / "spec.json").write_text(json.dumps(run.spec.to_dict(), indent=1))
    return directory


def load_state(run: Run, directory: Path, weights_only: bool = False) -> Run:
    """Restore what ``save_state`` wrote, so training continues exactly where it stopped."""
    directory = Path(directory)
    load_trainable_state(run.model, {k: v.to(run.device) for k, v in load_file(directory / TRAINABLE).items()})
    if weights_only:
        return run
    run.optimizer.load_state_dict(torch.load(directory / OPTIMIZER, map_location=run.device, weights_only=False))
    state = torch.load(directory / STATE, map_location="cpu", weights_only=False)
    for key in ("epoch", "history", "status", "best_eval_loss", "best_epoch", "bad_epochs"):
        setattr(run, key, state[key])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return run
