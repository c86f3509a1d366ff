"""The causal-LM loss on answer tokens only, without ever holding the full ``[tokens x vocab]`` logits.

A plain forward runs the LM head and the cross-entropy on every position,
prompt and padding included; on GSM8K about a third of the tokens carry a
label, and SmolLM2's 49k-word head over a 576-wide model makes the head a large
share of the compute. Here the decoder runs as usual, then only the positions
whose next token carries a label go through the head, in chunks; each chunk's
logits are recomputed in the backward pass (activation checkpointing), so at
most ``chunk`` rows of logits exist at any time. Same loss and gradients as the
plain path (tests/unit/test_loss.py). The labelled positions come as a flat index
built on the host (``tune_llama.data.packing.answer_positions``), so selecting
them is a gather: boolean indexing would make the host wait for the device to
count them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tune_llama.data.packing import MODEL_INPUTS, with_answer_positions
from tune_llama.spec import Spec


def decoder_and_head(model) -> Optional[tuple[torch.nn.Module, torch.nn.Module]]:
    """(decoder, LM head) of a HF causal LM, under a peft wrapper too; None for anything else."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        return None  # softcapped logits (Gemma-2 style) would need the plain path's extra step
    return decoder, head


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def fused_linear_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy (CUDA): head and loss in one kernel, chunked inside."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets)


def model_loss(model, batch: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
    """The model's own loss (full logits), from the model inputs and labels alone."""
    inputs = {k: batch[k] for k in MODEL_INPUTS + ("labels",) if k in batch}
    return model(**inputs, num_items_in_batch=num_items).loss


def answer_only_loss(model, batch: dict[str, torch.Tensor], num_items: int, chunk: int = 1024,
                     fused: bool = False) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens, normalised by ``num_items`` (the optimizer step's
    label count), as ``model(**batch, num_items_in_batch=num_items).loss`` computes it."""
    parts = decoder_and_head(model)
    if parts is None:
        return model_loss(model, batch, num_items)
    decoder, head = parts
    batch = with_answer_positions(batch)  # a caller without the host-side index: computed here (syncs on a GPU)
    hidden = decoder(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["answer_index"])
    targets = batch["answer_labels"]
    if fused and getattr(head, "bias", None) is None and hasattr(head, "weight"):
        return fused_linear_loss(head, hidden, targets) / max(num_items, 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total / max(num_items, 1)


def micro_batch_loss(spec: Spec, model, batch: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
    """One micro-batch's loss, normalised by ``n_items`` (the step's label count), as the spec computes it."""
    t = spec.training
    if t.answer_only_logits:
        return answer_only_loss(model, batch, n_items, chunk=t.loss_chunk_tokens, fused=spec.model.kernels == "liger")
    return model_loss(model, batch, n_items)
