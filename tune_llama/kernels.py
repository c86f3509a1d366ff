"""What a step runs on, and where it works: regional ``torch.compile`` with its time counted apart, the
autocast precision, the attention implementation, and whether packed rows keep examples apart.

Plain PyTorch, no Ray: the loop calls these.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import torch

from tune_llama.data.packing import PACKING_ATTENTION
from tune_llama.errors import SpecError
from tune_llama.spec import Spec

log = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``training.precision`` -> the dtype autocast (and FSDP's mixed precision) computes in; fp32 has none."""

# ---------------------------------------------------------------- regional compile


def decoder_layers(model) -> Optional[torch.nn.ModuleList]:
    """The decoder's layer list of a HF causal LM, under a peft wrapper too; None for anything else."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def compile_layers(model) -> int:
    """``torch.compile`` each decoder layer in place, as torchtune does: the layers share one compiled
    graph (parameters are graph inputs), so compiling costs one layer's time, not the model's, and the
    parameter names (checkpoints, the adapter) stay as they are. Returns how many layers were compiled."""
    layers = decoder_layers(model)
    if layers is None:
        log.warning("training.compile: no decoder layer list found in %s; running uncompiled",
                    type(model).__name__)
        return 0
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_wanted(spec: Spec, device: torch.device) -> bool:
    """``training.compile: auto`` compiles on CUDA (steps get faster) and not on CPU, where a first step
    waits tens of seconds for gcc and the steps gain little."""
    choice = spec.training.compile
    return device.type == "cuda" if choice == "auto" else bool(choice)


class CompileClock:
    """Seconds spent compiling in this process (dynamo's start/end callbacks; the backward graph, compiled
    lazily at the first backward, counts too), so a step's compile time can be taken out of its time."""

    _lock = threading.Lock()
    seconds = 0.0
    _started: dict[int, float] = {}

    @classmethod
    def total(cls) -> float:
        cls._register()
        return cls.seconds

    @classmethod
    def _register(cls) -> None:
        # Whenever ours are gone, not once per process: torch.compiler.reset() (a trial's end, in a trial process
        # that Tune reuses) clears dynamo's callbacks, and the next trial's compiling would count as 0 s.
        from torch._dynamo.callback import callback_handler
        with cls._lock:
            if cls._start in callback_handler.start_callbacks:
                return
            callback_handler.register_start_callback(cls._start)
            callback_handler.register_end_callback(cls._end)

    @classmethod
    def _start(cls, *args) -> None:
        cls._started[threading.get_ident()] = time.perf_counter()

    @classmethod
    def _end(cls, *args) -> None:
        start = cls._started.pop(threading.get_ident(), None)
        if start is not None:
            cls.seconds += time.perf_counter() - start


# ---------------------------------------------------------------- attention and packing: where they work

def check_attention(spec: Spec, device: torch.device) -> None:
    if spec.model.attn_implementation == "flex_attention" and device.type == "cpu":
        raise SpecError("model.attn_implementation", "flex_attention has no backward pass on CPU in torch; "
                                                     "use sdpa there (flex_attention is the GPU choice)")


def packing_supported(spec: Spec, workers: int = 1) -> tuple[bool, str]:
    """(whether ``data.packing`` can keep examples apart here, why not); ``workers``: how many data-parallel
    workers share each micro-batch (``tune_llama.distributed``), which packing cannot serve."""
    if spec.data.batching == "packed":
        return False, "data.batching=packed already fills whole rows"
    if spec.model.attn_implementation not in PACKING_ATTENTION:
        return False, f"model.attn_implementation={spec.model.attn_implementation} builds no mask from position ids"
    if spec.model.trust_remote_code:
        return False, "model.trust_remote_code: the model's own code may ignore the position ids' restarts"
    if workers > 1:
        return False, "a data-parallel trial shards padded rows across its workers"
    return True, ""
