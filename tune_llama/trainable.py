"""The Ray Tune trainable: a thin adapter from Tune to the plain-PyTorch loop.

Tune hands it the sampled params (and a checkpoint when resuming); it builds
the run, restores, trains, and reports the loop's metrics with a checkpoint at
every report point (``training.eval_every``).
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from ray import tune

from tune_llama.errors import CheckpointError, TrialOutOfMemory
from tune_llama.loop import Run, fit, load_state, save_state, setup
from tune_llama.spec import apply_params, spec_from_dict


def train_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """One trial: ``spec`` is the search's spec as a dict, ``config`` the sampled ``section.field`` values."""
    trial_spec = apply_params(spec_from_dict(spec), config)
    if trial_spec.search.resources.workers > 1:  # Ray Train workers; this process only drives them
        from tune_llama.distributed import train_trial_on_workers
        return train_trial_on_workers(trial_spec)
    run: Optional[Run] = None
    try:
        run = setup(trial_spec)
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            restore(run, Path(checkpoint.path))
        fit(run, save_checkpoint=save_to_temp, report=report_to_tune)
    except torch.OutOfMemoryError:
        data, training = trial_spec.data, trial_spec.training
        raise TrialOutOfMemory(
            f"CUDA out of memory at data.batch_size={data.batch_size}, data.max_length={data.max_length}: "
            f"lower data.batch_size and raise training.gradient_accumulation_steps (now "
            f"{training.gradient_accumulation_steps}) to keep the same update, or set "
            f"model.gradient_checkpointing=true"
        ) from None
    finally:
        # ASHA stops, failures and normal ends all free the model before the worker is reused.
        del run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def restore(run: Run, newest: Path) -> None:
    """Load the newest checkpoint Tune hands back; if it is damaged, the newest older one that loads.

    Tune keeps the trial's checkpoints side by side in its folder, so the older ones are its siblings.
    """
    candidates = [newest] + sorted((p for p in newest.parent.glob("checkpoint_*") if p.name < newest.name),
                                   reverse=True)
    for directory in candidates:
        try:
            load_state(run, directory)
        except CheckpointError as err:
            print(f"warning: {err}; trying an older checkpoint", file=sys.stderr)
            continue
        return
    raise CheckpointError(f"no readable checkpoint for this trial; the newest, {newest}, is damaged "
                          f"(delete the trial's checkpoint_* folders to restart it from scratch)")


SHARED_MEMORY = Path("/dev/shm")


def staging_dir(run: Run) -> Optional[Path]:
    """Where a checkpoint is written before Ray persists (copies) it: shared memory when it has room.

    Ray always copies the folder it is handed into the trial's storage; staged in RAM, the checkpoint
    reaches the disk once (Ray's copy) instead of twice.
    """
    needed = 4 * sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    try:
        if SHARED_MEMORY.is_dir() and shutil.disk_usage(SHARED_MEMORY).free > 2 * needed:
            return SHARED_MEMORY
    except OSError:
        pass
    return None


def save_to_temp(run: Run) -> Path:
    return save_state(run, Path(tempfile.mkdtemp(prefix="tune-llama-ckpt-", dir=staging_dir(run))))


def report_to_tune(metrics: dict, checkpoint_dir: Optional[Path]) -> None:
    if checkpoint_dir is None:
        tune.report(metrics)
        return
    try:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Ray has persisted its own copy
