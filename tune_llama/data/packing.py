"""Padding-free micro-batches: whole examples laid end to end in rows, kept apart by their position ids.

A packed batch holds the same examples as the padded one would, placed
first-fit-decreasing into rows no longer than its longest example, so short
examples share a row instead of each padding its own. It has no
``attention_mask``: ``position_ids`` restart at 0 for each example, and
transformers (5.x, ``masking_utils.find_packed_sequence_indices``) turns those
restarts into a block-diagonal causal mask for sdpa and eager, and into a
document ``BlockMask`` for ``flex_attention``, so no example sees another and
the loss equals the padded path's (tests/unit/test_packing.py). Rows are no longer
than the padded batch's rather than one long row per batch: sdpa and eager get
a dense mask and compute every masked pair, so one 4k-token row would cost
4k x 4k per head where the padded rows pay about each example's own square.
What packing saves is the padding; length-grouped batches have little, random
ones (and token budgets over mixed lengths) much more.

FlexAttention is the exception (``ONE_ROW_ATTENTION``): its document mask
skips the blocks that cross examples, so one long row costs about each
example's own square there, and a batch packs into one row (``one_row``), with
no padding at all.

Every micro-batch, packed or padded, also carries ``answer_index`` and
``answer_labels``: the flat positions whose next token carries a label and
those labels, computed here on the host, so the loss gathers them on the device
without boolean indexing (which waits for the device to learn the count).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from tune_llama.data.examples import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
DEVICE_KEYS = MODEL_INPUTS + ("labels", "answer_index", "answer_labels")
"""What goes to the device; ``example_lengths`` stays on the host (counting, splitting)."""
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations whose masks transformers builds from the position ids' restarts."""
ONE_ROW_ATTENTION = ("flex_attention",)
"""Attention that computes only the blocks its mask keeps: a packed batch is one row for it."""


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat index into ``[rows x (width - 1)]``, target) of every position whose next token has a label."""
    targets = labels[:, 1:].reshape(-1)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return index, targets[index]


def with_answer_positions(batch: Batch) -> Batch:
    if "answer_index" in batch:
        return batch
    index, targets = answer_positions(batch["labels"])
    return {**batch, "answer_index": index, "answer_labels": targets}


def first_fit_rows(lengths: list[int]) -> list[list[int]]:
    """Example indices per row: longest first, each into the first row with room, rows no longer than the
    longest example (the padded batch's width), so a packed batch never computes more than the padded one."""
    capacity = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def collate_packed(ids: list[torch.Tensor], labels: list[torch.Tensor], pad_id: int, one_row: bool = False) -> Batch:
    """One micro-batch of the examples ``ids``/``labels``, packed into rows (``first_fit_rows``), or all in one
    row with ``one_row``."""
    placed = [list(range(len(ids)))] if one_row else first_fit_rows([len(x) for x in ids])
    order = [i for row in placed for i in row]
    row_ids = [torch.cat([ids[i] for i in row]) for row in placed]
    row_labels = [torch.cat([labels[i] for i in row]) for row in placed]
    # The short rows' tail continues the last example's positions: it is padding after it, which causal
    # attention keeps from every real token, and it adds no restart that would read as one more example.
    positions = [torch.cat([torch.arange(len(ids[i])) for i in row]) for row in placed]
    width = max(len(r) for r in row_ids)
    positions = [torch.cat([p, p[-1] + 1 + torch.arange(width - len(p))]) for p in positions]
    batch = {
        "input_ids": pad_sequence(row_ids, batch_first=True, padding_value=pad_id),
        "labels": pad_sequence(row_labels, batch_first=True, padding_value=IGNORE_INDEX),
        "position_ids": torch.stack(positions),
        "example_lengths": torch.tensor([len(ids[i]) for i in order]),
    }
    return with_answer_positions(batch)


def real_tokens(batch: Batch) -> int:
    """Tokens that are not padding, counted on the host."""
    if "example_lengths" in batch:
        return int(batch["example_lengths"].sum())
    return int(batch["attention_mask"].sum())


def examples_of(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (input ids, labels) of each example in a host-side batch, packed or padded."""
    ids, labels = [], []
    if "example_lengths" not in batch:
        for row, (x, y, mask) in enumerate(zip(batch["input_ids"], batch["labels"], batch["attention_mask"])):
            n = int(mask.sum())
            ids.append(x[:n])
            labels.append(y[:n])
        return ids, labels
    lengths = iter(batch["example_lengths"].tolist())
    for x, y, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        start = 0
        for _ in range(int((pos == 0).sum())):
            n = next(lengths)
            ids.append(x[start:start + n])
            labels.append(y[start:start + n])
            start += n
    return ids, labels
