"""The causal-LM loss on answer tokens only, without ever holding the full ``[tokens x vocab]`` logits.

A plain forward runs the LM head and the cross-entropy on every position,
prompt and padding included; on GSM8K about a third of the tokens carry a
label, and SmolLM2's 49k-word head over a 576-wide model makes the head a large
share of the compute. Here the decoder runs as usual, then only the positions
whose next token carries a label go through the head, in chunks; each chunk's
logits are recomputed in the backward pass (activation checkpointing), so at
most ``chunk`` rows of logits exist at any time. Same loss and gradients as the
plain path (tests/test_loss.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tune_llama.data.examples import IGNORE_INDEX


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


def answer_only_loss(model, batch: dict[str, torch.Tensor], num_items: int, chunk: int = 1024,
                     fused: bool = False) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens, normalised by ``num_items`` (the optimizer step's
    label count), as ``model(**batch, num_items_in_batch=num_items).loss`` computes it."""
    parts = decoder_and_head(model)
    if parts is None:
        return model(**batch, num_items_in_batch=num_items).loss
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    if fused and getattr(head, "bias", None) is None and hasattr(head, "weight"):
        return fused_linear_loss(head, hidden, targets) / max(num_items, 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total / max(num_items, 1)
