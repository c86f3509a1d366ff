"""The checkpoint folder, owned here alone: its file names, save and load, RNG state, the sharded (FSDP)
form and its consolidation, and reading a checkpoint back as a model.

    checkpoint_NNNNNN/          Ray names the folders of a trial; ``train`` and the benches pick their own
        trainable.safetensors   the trained weights (the adapter alone for LoRA)
        optimizer.pt            the optimizer's state
        state.pt                progress, schedule, scaler and RNG: resume is exact, also mid-epoch
        spec.json               the trial's whole spec, sampled params applied
        metrics.json            the report it was taken at, so a checkpoint says how good it is by itself
        workers.json            a multi-worker trial's worker count and kind (refuses a resume with others)
        rng_rank{N}.pt          each worker's RNG state (multi-worker trials)
        sharded/                an FSDP trial's weights and optimizer, one file per worker

Torch is imported inside the functions: ``report`` and ``results`` read metrics without it.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from tune_llama.errors import CheckpointError, one_line
from tune_llama.paths import read_json

if TYPE_CHECKING:
    import torch

    from tune_llama.loop import TrainingRun
    from tune_llama.spec import ModelSpec, Spec

TRAINABLE, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.pt", "state.pt"
SPEC, METRICS, WORKERS, SHARDED = "spec.json", "metrics.json", "workers.json", "sharded"
FOLDER_GLOB = "checkpoint_*"
"""How Ray names a trial's checkpoint folders (``checkpoint_000003``): sorted by name, oldest first."""
PROGRESS = ("step", "examples_seen", "tokens_seen", "train_time_s", "eval_time_s", "history", "status",
            "best_eval_loss", "best_report", "bad_reports")
"""The ``TrainingRun`` fields a resume restores."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---------------------------------------------------------------- reading a folder without torch

def folders(trial_dir: Path) -> list[Path]:
    """A trial folder's checkpoint folders, oldest first."""
    return sorted(Path(trial_dir).glob(FOLDER_GLOB))


def holds_weights(directory: Path) -> bool:
    """Whether ``directory`` is a checkpoint with weights: one file, or an FSDP trial's shards."""
    return (directory / TRAINABLE).is_file() or (directory / SHARDED).is_dir()


def read_metrics(directory: Path) -> Optional[dict[str, Any]]:
    """The report a checkpoint was taken at, as it recorded it; None when it has none (or it is unreadable)."""
    metrics = read_json(Path(directory) / METRICS)
    return metrics if isinstance(metrics, dict) and metrics else None


def read_spec(directory: Path) -> Optional["Spec"]:
    """The trial's whole spec as the checkpoint recorded it; None when it has none."""
    from tune_llama.spec import spec_from_dict
    path = Path(directory) / SPEC
    return spec_from_dict(json.loads(path.read_text())) if path.is_file() else None


def write_json(directory: Path, name: str, value: Any, indent: Optional[int] = None) -> None:
    (Path(directory) / name).write_text(json.dumps(value, indent=indent))


# ---------------------------------------------------------------- RNG

def rng_state() -> dict:
    import numpy as np
    import torch
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    import numpy as np
    import torch
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------- one process

def progress_state(run: "TrainingRun") -> dict:
    return {**{key: getattr(run, key) for key in PROGRESS}, "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler else None, "rng": rng_state()}


def set_progress_state(run: "TrainingRun", state: dict) -> None:
    for key in PROGRESS:
        setattr(run, key, state[key])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def write_spec_and_metrics(run: "TrainingRun", directory: Path) -> None:
    write_json(directory, SPEC, run.spec.to_dict(), indent=1)
    write_json(directory, METRICS, run.history[-1] if run.history else {})


def save_state(run: "TrainingRun", directory: Path) -> Path:
    """Trainable weights (the adapter alone for LoRA), optimizer, schedule, scaler, RNG and progress."""
    import torch
    from safetensors.torch import save_file

    from tune_llama.model import trainable_state
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in trainable_state(run.model).items()}, directory / TRAINABLE)
    torch.save(run.optimizer.state_dict(), directory / OPTIMIZER)
    torch.save(progress_state(run), directory / STATE)
    write_spec_and_metrics(run, directory)
    return directory


def load_state(run: "TrainingRun", directory: Path, weights_only: bool = False) -> "TrainingRun":
    """Restore what ``save_state`` wrote, so training continues exactly where it stopped.

    A checkpoint that cannot be read (truncated, or from another model) is a ``CheckpointError`` naming it.
    """
    import torch
    from safetensors.torch import load_file

    from tune_llama.model import load_trainable_state
    directory = Path(directory)
    try:
        weights = load_file(directory / TRAINABLE)
        load_trainable_state(run.model, {k: v.to(run.device) for k, v in weights.items()})
        if weights_only:
            return run
        optimizer_state = torch.load(directory / OPTIMIZER, map_location=run.device, weights_only=False)
        state = torch.load(directory / STATE, map_location="cpu", weights_only=False)
    except Exception as err:  # safetensors, pickle and shape errors all mean: this file is unusable
        raise CheckpointError(f"checkpoint {directory} cannot be read: {one_line(err)}") from None
    run.optimizer.load_state_dict(optimizer_state)
    set_progress_state(run, state)
    return run


# ---------------------------------------------------------------- several workers

def save_worker_rng(directory: Path, rank: int) -> None:
    import torch
    torch.save(rng_state(), Path(directory) / rng_file(rank))


def load_worker_rng(directory: Path, rank: int) -> None:
    import torch
    own = Path(directory) / rng_file(rank)
    if own.is_file():
        set_rng_state(torch.load(own, weights_only=False))


def write_workers(directory: Path, world: int, parallel: str) -> None:
    write_json(directory, WORKERS, {"workers": world, "parallel": parallel})


def check_workers(directory: Path, world: int, parallel: str) -> None:
    """A checkpoint written by another number or kind of workers is refused with one line: the global batch,
    hence the step count, would differ."""
    directory = Path(directory)
    try:
        written = json.loads((directory / WORKERS).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory} cannot be read: {one_line(err)}") from None
    if (written.get("workers"), written.get("parallel")) != (world, parallel):
        raise CheckpointError(
            f"checkpoint {directory} was written by {written.get('workers')} {written.get('parallel')} workers, "
            f"this trial has {world} {parallel} workers: resume with search.resources.workers="
            f"{written.get('workers')} and training.parallel={written.get('parallel')}")


def _fsdp_state(run: "TrainingRun") -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model, optim = get_state_dict(run.model, run.optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model, "optim": optim}


def full_trainable_weights(model: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
    """An FSDP model's whole trained weights on the CPU under their one-process names, on rank 0 (every
    worker must call it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))
    return {k.removeprefix("inner."): v.contiguous() for k, v in full.items()}


def save_sharded(run: "TrainingRun", directory: Path, rank: int) -> None:
    """FSDP: weights and optimizer as a sharded checkpoint; rank 0 adds progress, and for LoRA the whole adapter
    (small: the ordinary one-process file, as export and finalists read it). Collective: every worker calls it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    directory = Path(directory)
    dcp.save(_fsdp_state(run), checkpoint_id=str(directory / SHARDED))
    if run.spec.model.lora.enabled:
        full = full_trainable_weights(run.model)
        if rank == 0:
            save_file(full, directory / TRAINABLE)
    if rank == 0:
        torch.save(progress_state(run), directory / STATE)
        write_spec_and_metrics(run, directory)


def load_sharded(run: "TrainingRun", directory: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    directory = Path(directory)
    try:
        state = _fsdp_state(run)
        dcp.load(state, checkpoint_id=str(directory / SHARDED))
        progress = torch.load(directory / STATE, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {directory} cannot be read: {one_line(err)}") from None
    set_state_dict(run.model, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True))
    set_progress_state(run, progress)


def consolidate(checkpoint: Path, out: Optional[Path] = None) -> Path:
    """A sharded (FSDP) checkpoint's trained weights as one ordinary ``trainable.safetensors`` (no process
    group needed), so export and evaluation read it like a one-process checkpoint. Returns the file."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    checkpoint = Path(checkpoint)
    out = Path(out or checkpoint / TRAINABLE)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(checkpoint / SHARDED), str(Path(tmp) / "full.pt"))
        model = torch.load(Path(tmp) / "full.pt", weights_only=False)["model"]
    save_file({k.removeprefix("inner."): v.contiguous() for k, v in model.items()}, out)
    return out


@contextlib.contextmanager
def weights_file(checkpoint: Path) -> Iterator[Path]:
    """The ``trainable.safetensors`` of any checkpoint: as saved, or consolidated from FSDP shards into a
    temporary file that is gone afterwards (the checkpoint folder itself is never changed)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / TRAINABLE).is_file() or not (checkpoint / SHARDED).is_dir():
        yield checkpoint / TRAINABLE
        return
    with tempfile.TemporaryDirectory(prefix="tune-llama-consolidated-") as tmp:
        yield consolidate(checkpoint, Path(tmp) / TRAINABLE)


def load_model(model_spec: "ModelSpec", checkpoint: Path, device: "torch.device", seed: int = 0):
    """(model, tokenizer) with a checkpoint's trained weights loaded, in eval mode, ready to generate.

    Quantization and gradient checkpointing are training-time choices: the model is rebuilt in full precision,
    so an adapter can be merged into it. FSDP shards are consolidated first.
    """
    import dataclasses

    from safetensors.torch import load_file

    from tune_llama.model import load_model as build_model
    from tune_llama.model import load_tokenizer, load_trainable_state
    model_spec = dataclasses.replace(model_spec, quantization="none", gradient_checkpointing=False)
    tokenizer = load_tokenizer(model_spec)
    model = build_model(model_spec, tokenizer, device, seed=seed)
    with weights_file(checkpoint) as weights:
        load_trainable_state(model, {k: v.to(device) for k, v in load_file(weights).items()})
    model.eval()
    return model, tokenizer
