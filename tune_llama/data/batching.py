"""Cut encoded examples into padded batches, deterministically for (seed, epoch).

Modes (``data.batching``):

- ``length_grouped``: shuffle, sort by length inside windows of
  ``batch_size * mega_batch_mult`` examples, cut into batches, shuffle the
  batches. Little padding; every example is still its own row.
- ``random``: shuffle once per epoch, then cut in order. The example sequence
  does not depend on the batch size, so 4 batches of 1 see what 1 batch of 4 sees.
- ``packed``: concatenate the shuffled examples into rows of exactly
  ``max_length`` tokens (the last row may be shorter). No padding, but examples
  sharing a row attend to each other, so the maths differs from the other modes.

Each batch holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
prompts and padding), right-padded to its longest row.
"""

from __future__ import annotations

import random

import torch
from torch.nn.utils.rnn import pad_sequence

from tune_llama.data.examples import IGNORE_INDEX, Encoded
from tune_llama.spec import DataSpec

Batch = dict[str, torch.Tensor]


def make_batches(encoded: Encoded, data: DataSpec, pad_id: int, *, seed: int, epoch: int,
                 shuffle: bool = True, batch_size: int | None = None) -> list[Batch]:
    """The batches of one epoch. ``shuffle=False`` (evaluation) keeps every example exactly once,
    in file order, except that ``length_grouped`` sorts by length to save padding."""
    batch_size = batch_size or data.batch_size
    # A str seed: (seed=0, epoch=1) and (seed=1, epoch=0) must not give the same order.
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = list(range(len(encoded)))
    if shuffle:
        rng.shuffle(order)

    if data.batching == "packed":
        ids, labels = pack(encoded, order, data.max_length)
        return [collate(ids[i:i + batch_size], labels[i:i + batch_size], pad_id)
                for i in range(0, len(ids), batch_size)]
    if data.batching == "length_grouped":
        groups = length_grouped(order, encoded.lengths, batch_size, data.mega_batch_mult, rng if shuffle else None)
    else:
        groups = chunks(order, batch_size)
    return [collate([encoded.input_ids[i] for i in g], [encoded.labels[i] for i in g], pad_id) for g in groups]


def chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def length_grouped(order: list[int], lengths: list[int], batch_size: int, mega_batch_mult: int,
                   rng: random.Random | None) -> list[list[int]]:
    """Batches of similar length. Without ``rng`` (evaluation): one global sort, no shuffling."""
    if rng is None:
        return chunks(sorted(order, key=lambda i: -lengths[i]), batch_size)
    window = batch_size * mega_batch_mult
    groups = []
    for mega in chunks(order, window):
        groups += chunks(sorted(mega, key=lambda i: -lengths[i]), batch_size)
    rng.shuffle(groups)  # else every window would run long -> short in the same rhythm
    return groups


def pack(encoded: Encoded, order: list[int], max_length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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


def real_token_share(batches: list[Batch]) -> float:
    """Real (unpadded) tokens over all tokens in the batches."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return real / total if total else 1.0
