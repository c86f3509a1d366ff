"""The Ray Tune trainable: a thin adapter from Tune to the plain-PyTorch loop.

Tune hands it the sampled params (and a checkpoint when resuming); it builds
the run, restores, trains, and reports the loop's metrics with a checkpoint at
every report point (``training.eval_every``). A multi-worker trial
(``search.resources.workers > 1``) drives Ray Train instead, whose workers run
``tune_llama.distributed``'s side of the loop (``train_trial_on_workers``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
from ray import tune

from tune_llama.errors import CheckpointError, TrialOutOfMemory
from tune_llama import checkpoint
from tune_llama.checkpoint import folders, load_state, save_state
from tune_llama.loop import TrainingRun, fit, reset_process_peak, setup
from tune_llama.live import StepFile
from tune_llama.ray_private import register_placement_group
from tune_llama.resources import ray_resources, worker_resources
from tune_llama.spec import Spec, apply_params, spec_from_dict


def train_trial(config: dict[str, Any], spec: dict[str, Any], live_dir: Optional[str] = None) -> None:
    """One trial: ``spec`` is the search's spec as a dict, ``config`` the sampled ``section.field`` values;
    between reports the trial writes where it is into ``live_dir`` (``live.StepFile``) for the live table."""
    give_memory_back()  # what an earlier trial in this process left (reuse_actors), before this one's peak starts
    reset_process_peak()
    trial_spec = apply_params(spec_from_dict(spec), config)
    if trial_spec.search.resources.workers > 1:  # Ray Train workers; this process only drives them
        return train_trial_on_workers(trial_spec)
    run: Optional[TrainingRun] = None
    try:
        run = setup(trial_spec)
        limit_rows(run)
        handed_back = tune.get_checkpoint()
        if handed_back:
            restore(run, Path(handed_back.path))
        on_step = StepFile(Path(live_dir) / f"{tune.get_context().get_trial_id()}.json",
                           trial_spec.training.log_every) if live_dir else None
        fit(run, save_checkpoint=save_to_temp, report=report_to_ray, on_step=on_step)
    except torch.OutOfMemoryError:
        raise TrialOutOfMemory(out_of_memory_message(trial_spec)) from None
    finally:
        # Stops at a rung, failures and normal ends all free the model before the process runs the next trial.
        # A stop arrives as an exception (Tune's SystemExit inside tune.report), whose traceback holds the loop's
        # frames and with them the model and its batches: their locals go before the memory is given back.
        ending = sys.exc_info()[1]
        if ending is not None:
            traceback.clear_frames(ending.__traceback__)
        del run, ending
        torch.compiler.reset()  # the next trial in this process compiles its own layers, not against our guards
        give_memory_back()


def give_memory_back() -> None:
    """Free what ended trials left in this process and hand the freed heap back to the system.

    Without it, one reused trial process grew to the sum of its trials' fragments (17.8 GB after four
    SmolLM2 + LoRA trials of 6-7 GB each): glibc keeps freed memory in each thread's arena (every trial runs
    in a new thread) and raises its mmap threshold after large frees, so later large tensors come from those
    arenas too. ``malloc_trim(0)`` returns the free pages of every arena (``docs/metrics.md``).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is its own
        pass


def out_of_memory_message(spec) -> str:
    """One line naming the field to lower: the token budget when batches are cut by it, else the batch size."""
    data, training = spec.data, spec.training
    if isinstance(data.max_tokens_per_batch, int):
        where, lower = f"data.max_tokens_per_batch={data.max_tokens_per_batch}", "data.max_tokens_per_batch"
    else:
        where, lower = f"data.batch_size={data.batch_size}", "data.batch_size"
    return (f"CUDA out of memory at {where}, data.max_length={data.max_length}: lower {lower} and raise "
            f"training.gradient_accumulation_steps (now {training.gradient_accumulation_steps}) to keep the same "
            f"update, or set model.gradient_checkpointing=true")


# A fault to inject where there is no GPU to fill (tests, bench/gpu_check.sh SHAPE=tiny): a forward of more
# rows than this raises CUDA's out-of-memory error, as a GPU too small for the batch would.
OOM_ABOVE_ROWS = "TUNE_LLAMA_OOM_ABOVE_ROWS"


def limit_rows(run: TrainingRun) -> None:
    limit = os.environ.get(OOM_ABOVE_ROWS)
    if not limit:
        return

    def too_many_rows(module, args):
        if args and args[0].shape[0] > int(limit):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {args[0].shape[0]} rows > {limit})")
    # Every forward, training and validation, full or answer-only logits, starts at the embeddings.
    run.model.get_input_embeddings().register_forward_pre_hook(too_many_rows)


def restore(run: TrainingRun, newest: Path) -> None:
    """Load the newest checkpoint Tune hands back; if it is damaged, the newest older one that loads.

    Tune keeps the trial's checkpoints side by side in its folder, so the older ones are its siblings.
    """
    candidates = [newest] + [p for p in reversed(folders(newest.parent)) if p.name < newest.name]
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


def staging_dir(run: TrainingRun) -> Optional[Path]:
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


def save_to_temp(run: TrainingRun) -> Path:
    return save_state(run, Path(tempfile.mkdtemp(prefix="tune-llama-ckpt-", dir=staging_dir(run))))


def report_to_ray(metrics: dict, checkpoint_dir: Optional[Path], api=tune) -> None:
    """Report the metrics with the checkpoint staged in ``checkpoint_dir`` through ``api`` (``ray.tune``, or
    ``ray.train`` on a worker: each has its own ``report`` and ``Checkpoint``); the staged folder is gone
    afterwards, as Ray has persisted its own copy."""
    if checkpoint_dir is None:
        api.report(metrics)
        return
    try:
        api.report(metrics, checkpoint=api.Checkpoint.from_directory(str(checkpoint_dir)))
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


# ---------------------------------------------------------------- trials of several workers (Ray Train)

def train_trial_on_workers(spec: Spec) -> None:
    """The Tune trial of a multi-worker spec: run its workers with Ray Train and let Tune see their reports.

    Retries are Tune's (``search.max_failures``): Train's own are off, so one budget counts every failure. A
    retried trial starts a Train run of the same name in the same folder, which hands back its latest
    checkpoint. The search frees each ended trial's placement group (``callbacks.ReleaseWorkers``).
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    each, s = worker_resources(spec), spec.search
    # The trial's folder in the search's storage (get_trial_dir is a per-session staging copy): a retry, or
    # a resumed search, finds Train's checkpoints there.
    storage = tune.get_context().get_storage()
    trial_path = Path(storage.trial_fs_path)
    trainer = TorchTrainer(
        train_worker, train_loop_config={"spec": spec.to_dict(), "trial_id": tune.get_context().get_trial_id()},
        torch_config=TorchConfig(backend="nccl" if each["gpu"] else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=s.resources.workers, use_gpu=bool(each["gpu"]),
                                               resources_per_worker=ray_resources(each), placement_strategy="PACK"),
        run_config=ray.train.RunConfig(
            name=trial_path.name, storage_path=str(trial_path.parent), storage_filesystem=storage.storage_filesystem,
            callbacks=[TuneReportCallback()], failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.keep_checkpoints,
                                                         checkpoint_score_attribute=s.metric,
                                                         checkpoint_score_order=s.mode)))
    trainer.fit()


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: build, restore Train's latest checkpoint, train, report every point."""
    import ray.train
    import torch.distributed as dist

    from tune_llama.distributed import fit_workers, load_worker_state, save_worker_state, setup_workers
    if torch.cuda.is_available():
        import ray.train.torch
        torch.cuda.set_device(ray.train.torch.get_device())
    run, team = setup_workers(spec_from_dict(config["spec"]))
    if team.rank == 0:
        register_placement_group(config["trial_id"])
    handed_back = ray.train.get_checkpoint()
    if handed_back:
        with handed_back.as_directory() as directory:
            load_worker_state(run, team, Path(directory))

    def save(run_: TrainingRun) -> Path:
        return save_worker_state(run_, team, Path(tempfile.mkdtemp(prefix="tune-llama-ckpt-")))

    def report(metrics: dict, directory: Optional[Path]) -> None:
        # Tune sees rank 0's row: memory is the largest worker's (tokens and time were combined before).
        metrics["peak_memory_gb"] = team.reduce([metrics["peak_memory_gb"]], op=dist.ReduceOp.MAX)[0]
        if directory is not None and team.rank == 0 and (directory / checkpoint.METRICS).exists():
            checkpoint.write_json(directory, checkpoint.METRICS, metrics)
        report_to_ray(metrics, directory, api=ray.train)

    fit_workers(run, team, save_checkpoint=save, report=report)
