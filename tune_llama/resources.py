"""What a trial asks Ray for, in one place: ``search.resources`` as one training process's resources, under
Ray's names, for a Tune trial, a Ray Train worker or a Ray task (the finalists), and as text for errors."""

from __future__ import annotations

from typing import Any

from tune_llama.spec import Spec

RAY_NAMES = {"cpu": "CPU", "gpu": "GPU", "memory": "memory"}
"""``worker_resources`` keys -> Ray's resource names (memory in bytes)."""


def worker_resources(spec: Spec) -> dict[str, float]:
    """One training process's resources: a one-process trial's, or each worker's of a multi-worker one
    (``gpu: null`` is 1 when CUDA is there, else 0; ``memory`` in bytes, only when ``memory_gb`` is set)."""
    r = spec.search.resources
    if r.gpu is not None:
        gpu = r.gpu
    else:
        import torch
        gpu = 1.0 if torch.cuda.is_available() else 0.0
    return {"cpu": r.cpu, "gpu": gpu, **({"memory": r.memory_gb * 2**30} if r.memory_gb else {})}


def ray_resources(each: dict[str, float]) -> dict[str, float]:
    """``worker_resources`` under Ray's names, the zero ones left out (Ray Train's ``resources_per_worker``)."""
    return {RAY_NAMES[k]: v for k, v in each.items() if v}


def tune_trial_resources(spec: Spec) -> dict[str, float]:
    """What the Tune trial itself holds. With workers > 1 the trial only drives Ray Train, whose workers take
    ``worker_resources`` each in their own placement group: the driver holds nothing (Tune refuses an all-zero
    request, hence one byte of memory), and ``preflight.check_cluster`` caps how many trials run at once."""
    if spec.search.resources.workers == 1:
        return worker_resources(spec)
    return {"cpu": 0, "gpu": 0, "memory": 1}


def task_options(each: dict[str, float]) -> dict[str, Any]:
    """``worker_resources`` as ``ray.remote`` options, for work that runs like one trial (a finalist's scoring)."""
    return {"num_cpus": each.get("cpu", 1), "num_gpus": each.get("gpu", 0), "memory": each.get("memory")}


def resources_text(resources: dict[str, float]) -> str:
    """``cpu=1, gpu=0, memory_gb=11.1`` for one-line errors."""
    return ", ".join(f"memory_gb={v / 2**30:.3g}" if k == "memory" else f"{k}={v:g}" for k, v in resources.items())
