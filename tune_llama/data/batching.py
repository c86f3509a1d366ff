"""Cut encoded examples into padded batches, deterministically for (seed, epoch).

Modes (``data.batching``):

- ``length_grouped``: shuffle, sort by length inside windows of
  ``batch_size * mega_batch_mult`` examples, cut into batches, shuffle the
  batches. Little padding; every example is still its own row. With
  ``max_tokens_per_batch`` the cut is by token budget (rows x longest row)
  instead of ``batch_size`` rows: short examples come many to a batch.
- ``random``: shuffle once per epoch, then cut in order. The example sequence
  does not depend on the batch size, so 4 batches of 1 see what 1 batch of 4 sees.
- ``packed``: concatenate the shuffled examples into rows of exactly
  ``max_length`` tokens (the last row may be shorter). No padding, but examples
  sharing a row attend to each other, so the maths differs from the other modes.

Each batch holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
prompts and padding), right-padded to its longest row. With ``pack=True``
(the loop's ``data.packing``) the same examples come padding-free instead
(``tune_llama.data.packing``), and a token budget counts real tokens. ``split_batch`` cuts a
micro-batch, packed or padded, into two of half as many examples (a step that ran out of memory).
"""

from __future__ import annotations

import random
from functools import partial
from typing import Callable

import torch
from torch.nn.utils.rnn import pad_sequence

from tune_llama.data.examples import IGNORE_INDEX, Encoded
from tune_llama.data.packing import Batch, collate_packed, examples_of, with_answer_positions
from tune_llama.spec import DataSpec


def make_batches(encoded: Encoded, data: DataSpec, pad_id: int, *, seed: int, epoch: int,
                 shuffle: bool = True, batch_size: int | None = None, pack: bool = False,
                 one_row: bool = False) -> list[Batch]:
    """The batches of one epoch. ``shuffle=False`` (evaluation) keeps every example exactly once,
    in file order, except that ``length_grouped`` sorts by length to save padding. ``pack``: each
    batch's examples packed padding-free into rows (not for ``batching: packed``, whose rows are full),
    each batch in a single row with ``one_row`` (``packing.ONE_ROW_ATTENTION``)."""
    batch_size = batch_size or data.batch_size
    if data.batching == "packed":
        order = epoch_order(len(encoded), seed, epoch, shuffle)[0]
        ids, labels = concatenated_rows(encoded, order, data.max_length)
        return [collate(ids[i:i + batch_size], labels[i:i + batch_size], pad_id)
                for i in range(0, len(ids), batch_size)]
    groups = index_batches(encoded, data, seed=seed, epoch=epoch, shuffle=shuffle, batch_size=batch_size, pack=pack)
    if pack:
        return [collate_packed([encoded.input_ids[i] for i in g], [encoded.labels[i] for i in g], pad_id, one_row)
                for g in groups]
    return [collate([encoded.input_ids[i] for i in g], [encoded.labels[i] for i in g], pad_id) for g in groups]


def count_batches(encoded: Encoded, data: DataSpec, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                  batch_size: int | None = None, pack: bool = False) -> int:
    """``len(make_batches(...))`` with the same arguments, without building a tensor.

    With a token budget (``max_tokens_per_batch``) the batches come from one
    global sort by length, so the count is the same for every seed and epoch.
    """
    batch_size = batch_size or data.batch_size
    if data.batching == "packed":
        rows = -(-sum(encoded.lengths) // data.max_length)
        return -(-rows // batch_size)
    if data.batching == "length_grouped" and data.max_tokens_per_batch is not None:
        return len(index_batches(encoded, data, seed=seed, epoch=epoch, shuffle=shuffle, batch_size=batch_size,
                                 pack=pack))
    return -(-len(encoded) // batch_size)  # fixed-size batches: only the last may be short


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> tuple[list[int], random.Random]:
    """The example order of an epoch and the generator that made it (length grouping goes on drawing)."""
    # A str seed: (seed=0, epoch=1) and (seed=1, epoch=0) must not give the same order.
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = list(range(n))
    if shuffle:
        rng.shuffle(order)
    return order, rng


def index_batches(encoded: Encoded, data: DataSpec, *, seed: int, epoch: int, shuffle: bool,
                  batch_size: int, pack: bool = False) -> list[list[int]]:
    """The example indices of each batch, for the modes whose batches are whole examples."""
    order, rng = epoch_order(len(encoded), seed, epoch, shuffle)
    if data.batching != "length_grouped":
        return chunks(order, batch_size)
    if data.max_tokens_per_batch is None:
        cut, window = partial(chunks, size=batch_size), batch_size * data.mega_batch_mult
    else:
        # As fairseq does: batches cut from one global sort, only their order shuffled each epoch. Every
        # epoch then has the same number of batches, so steps per epoch and the schedule are exact.
        # Packed, a batch costs its real tokens; padded, its rows x longest row.
        chunker = packed_budget_chunks if pack else budget_chunks
        cut, window = partial(chunker, lengths=encoded.lengths, budget=data.max_tokens_per_batch), len(order)
    return length_grouped(order, encoded.lengths, max(window, 1), cut, rng if shuffle else None)


def chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def budget_chunks(longest_first: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive batches of rows x longest row <= ``budget`` tokens (at least one row each).

    The rows run longest first, so a batch's first row is its longest and fixes its padded width.
    """
    batches, start = [], 0
    while start < len(longest_first):
        rows = max(1, budget // lengths[longest_first[start]])
        batches.append(longest_first[start:start + rows])
        start += rows
    return batches


def packed_budget_chunks(longest_first: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive batches of at most ``budget`` real tokens (at least one example each)."""
    batches: list[list[int]] = []
    used = budget
    for i in longest_first:
        if used + lengths[i] > budget:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += lengths[i]
    return batches


def length_grouped(order: list[int], lengths: list[int], window: int, cut: Callable[[list[int]], list[list[int]]],
                   rng: random.Random | None) -> list[list[int]]:
    """Batches of similar length: each window of ``window`` examples sorted longest first, then ``cut``.
    Without ``rng`` (evaluation): one global sort, no shuffling."""
    if rng is None:
        return cut(sorted(order, key=lambda i: -lengths[i]))
    groups = []
    for mega in chunks(order, window):
        groups += cut(sorted(mega, key=lambda i: -lengths[i]))
    rng.shuffle(groups)  # else every window would run long -> short in the same rhythm
    return groups


def concatenated_rows(encoded: Encoded, order: list[int], max_length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rows of ``max_length`` tokens cut from the concatenated examples (the last row may be shorter)."""
    if not order:
        return [], []
    ids = torch.cat([encoded.input_ids[i] for i in order]).split(max_length)
    labels = torch.cat([encoded.labels[i] for i in order]).split(max_length)
    return list(ids), list(labels)


def collate(rows: list[torch.Tensor], label_rows: list[torch.Tensor], pad_id: int) -> Batch:
    lengths = torch.tensor([len(r) for r in rows])
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)  # copies: batches never alias examples
    return {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
        "labels": pad_sequence(label_rows, batch_first=True, padding_value=IGNORE_INDEX),
    }


def split_batch(batch: Batch, pad_id: int) -> list[Batch]:
    """The batch's examples in two micro-batches of half as many (same layout), for a step that ran out
    of memory; a batch of one example cannot be split (ValueError)."""
    ids, labels = examples_of(batch)
    if len(ids) < 2:
        raise ValueError("a micro-batch of one example cannot be split")
    half = len(ids) // 2
    if "example_lengths" in batch:
        # First-fit rows put two or more examples in two or more rows (the longest fills its own), so one row
        # of several examples is the one-row layout.
        one_row = len(batch["input_ids"]) == 1
        return [collate_packed(ids[:half], labels[:half], pad_id, one_row),
                collate_packed(ids[half:], labels[half:], pad_id, one_row)]
    return [with_answer_positions(collate(ids[:half], labels[:half], pad_id)),
            with_answer_positions(collate(ids[half:], labels[half:], pad_id))]


def real_token_share(batches: list[Batch]) -> float:
    """Real (unpadded) tokens over all tokens in the batches."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return real / total if total else 1.0
