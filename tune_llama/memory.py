"""Keeping a trial alive when a step does not fit: the token budget sized to the card
(``max_tokens_per_batch: auto``), and halving a step that ran out of memory.

Plain PyTorch, no Ray: the loop calls these.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from tune_llama.data.batching import collate, split_batch
from tune_llama.data.examples import IGNORE_INDEX
from tune_llama.data.packing import DEVICE_KEYS, collate_packed, with_answer_positions
from tune_llama.kernels import AUTOCAST
from tune_llama.loss import micro_batch_loss
from tune_llama.spec import Spec

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- token budget: probe, and halve on OOM

PROBE_MEMORY_SHARE = 0.85
"""A probed budget must leave this share of the card's memory unused by its peak (plus optimizer state)."""
PROBE_MAX_DOUBLINGS = 7
"""At most max_length x 2^7 tokens per micro-batch: past that a step gains nothing but latency."""


def probe_budget(try_tokens: Callable[[int], int], max_length: int, memory_bytes: int, reserved_bytes: int) -> int:
    """The largest budget ``max_length x 2^k`` whose forward + backward (``try_tokens(budget)``, returning
    its peak bytes) fits with ``reserved_bytes`` added under ``PROBE_MEMORY_SHARE`` of ``memory_bytes``.

    Budgets are powers of two times ``max_length``, so a trial resumed on the same kind of card probes
    the same budget and sees the same batches. At least ``max_length`` (one example always fits)."""
    best = max_length
    for k in range(PROBE_MAX_DOUBLINGS + 1):
        budget = max_length * 2 ** k
        try:
            peak = try_tokens(budget)
        except torch.OutOfMemoryError:
            break
        if peak + reserved_bytes > PROBE_MEMORY_SHARE * memory_bytes:
            break
        best = budget
    return best


def auto_budget(spec: Spec, model, tokenizer, device: torch.device, packing: bool,
                one_row: bool = False) -> Optional[int]:
    """``max_tokens_per_batch: auto``: on CUDA the largest budget that fits (``probe_budget``); on CPU
    none (``batch_size`` examples), since a budget brings nothing there."""
    if device.type != "cuda":
        return None
    data, vocab = spec.data, len(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_bytes = (2 if spec.training.optimizer == "adamw" else 1) * sum(p.numel() * p.element_size()
                                                                             for p in trainable)

    def try_tokens(tokens: int) -> int:
        rows = [torch.randint(4, vocab, (data.max_length,)) for _ in range(tokens // data.max_length)]
        labels = [torch.cat([torch.full((r.numel() // 3,), IGNORE_INDEX), r[r.numel() // 3:]]) for r in rows]
        batch = collate_packed(rows, labels, tokenizer.pad_token_id, one_row) if packing \
            else collate(rows, labels, tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in with_answer_positions(batch).items() if k in DEVICE_KEYS}
        torch.cuda.reset_peak_memory_stats(device)
        try:
            model.train()
            with torch.autocast(device.type, dtype=AUTOCAST.get(spec.training.precision),
                                enabled=spec.training.precision in AUTOCAST):
                loss = micro_batch_loss(spec, model, batch, len(batch["answer_labels"]))
            loss.backward()
            return torch.cuda.max_memory_allocated(device)
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    budget = probe_budget(try_tokens, data.max_length, torch.cuda.mem_get_info(device)[1], optimizer_bytes)
    log.info("data.max_tokens_per_batch=auto: %d tokens per micro-batch", budget)
    return budget


class Halving:
    """How many pieces each micro-batch runs in: 1, and twice that after every out-of-memory step."""

    def __init__(self, pad_id: int, enabled: bool = True):
        self.pad_id, self.enabled = pad_id, enabled
        self.pieces = 1
        self.retries = 0

    def split(self, window: list[dict]) -> list[dict]:
        """Every micro-batch of ``window`` cut into up to ``pieces`` smaller ones (a one-example piece stays)."""
        out = window
        for _ in range(self.pieces.bit_length() - 1):
            out = [piece for batch in out for piece in halves(batch, self.pad_id)]
        return out

    def run(self, window: list[dict], run_pieces: Callable[[list[dict]], None], reset: Callable[[], None]) -> None:
        """``run_pieces`` over ``window``; on OOM, ``reset()`` (drop the partial gradients), halve the pieces
        and run the whole window again: the same examples, so the same update."""
        while True:
            pieces = self.split(window)
            try:
                return run_pieces(pieces)
            except torch.OutOfMemoryError:
                if not self.enabled or all(examples_in(b) < 2 for b in pieces):
                    raise
                reset()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.pieces *= 2
                self.retries += 1
                log.warning("out of memory in a training step: retrying it with micro-batches cut in %d",
                            self.pieces)


def examples_in(batch: dict) -> int:
    return len(batch["example_lengths"]) if "example_lengths" in batch else batch["input_ids"].shape[0]


def halves(batch: dict, pad_id: int) -> list[dict]:
    return split_batch(batch, pad_id) if examples_in(batch) >= 2 else [batch]
