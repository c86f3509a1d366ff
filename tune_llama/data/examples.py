"""Turn problems into token ids and labels: the loss falls only on the answer and EOS."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tune_llama.spec import DataSpec, SpecError

IGNORE_INDEX = -100  # the label torch's cross-entropy (and HF models) skip
UNKNOWN_SHARE_WARNING = 0.01
"""Warn when more than this share of the encoded tokens are the tokenizer's unknown token."""

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Token ids and labels, one 1-D int64 tensor per example (batching pads them in C++)."""

    input_ids: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    truncated: int = 0
    """Examples cut at ``data.max_length`` (they lose their EOS and answer tail)."""
    dropped: int = 0
    """Problems left out for being longer than ``data.max_length`` (not in ``input_ids``)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def format_prompt(template: str, question: str) -> str:
    return template.format(question=question)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default encoding starts with BOS (Llama-2 does, SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def encode(problems: list[dict[str, str]], tokenizer, data: DataSpec) -> Encoded:
    """Prompt ids + answer ids + EOS, labels -100 on the prompt; longer than ``data.max_length``
    handled by ``data.overlong``.

    Prompt and answer are tokenized separately, so training sees the exact
    prompt tokens that generation is later conditioned on.
    """
    if not problems:
        return Encoded()
    prompts = [format_prompt(data.prompt_template, p["question"]) for p in problems]
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    answer_ids = tokenizer([p["answer"] for p in problems], add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id]

    ids, labels, lengths, truncated, dropped = [], [], [], 0, 0
    for number, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
        prompt = bos + prompt
        target = answer + eos
        full = len(prompt) + len(target)
        if full > data.max_length:
            if data.overlong == "error":
                raise overlong_error(problems[number], number, len(problems), full, data)
            # A prompt with no room for one answer token would train on nothing: dropped even under truncate.
            if data.overlong == "drop" or len(prompt) >= data.max_length:
                dropped += 1
                continue
            truncated += 1
        n = min(full, data.max_length)
        ids += (prompt + target)[:n]
        labels += ([IGNORE_INDEX] * len(prompt) + target)[:n]
        lengths.append(n)
    if not lengths:
        hint = " or set data.overlong=truncate" if data.overlong == "drop" else ""
        raise SpecError("data.max_length", f"all {len(problems)} examples are longer than {data.max_length} tokens "
                                           f"and were dropped (data.overlong={data.overlong}); "
                                           f"raise data.max_length{hint}")
    # One tensor split into per-example views: far faster than a torch.tensor call per example.
    flat_ids = torch.tensor(ids)
    out = Encoded(list(flat_ids.split(lengths)), list(torch.tensor(labels).split(lengths)), truncated, dropped)
    warn_if_overlong(out, data)
    warn_if_unknown(flat_ids, tokenizer)
    return out


def overlong_error(problem: dict[str, str], number: int, count: int, tokens: int, data: DataSpec) -> SpecError:
    question = " ".join(problem["question"].split())
    shown = question if len(question) <= 60 else question[:57] + "..."
    return SpecError("data.max_length", f"example {number + 1} of {count} ({shown!r}) is {tokens} tokens, "
                                        f"over {data.max_length} (data.overlong=error); raise data.max_length "
                                        f"or set data.overlong to truncate or drop")


def warn_if_overlong(encoded: Encoded, data: DataSpec) -> None:
    if encoded.truncated or encoded.dropped:
        log.warning("%d of %d examples are longer than data.max_length=%d: %d truncated, %d dropped "
                    "(data.overlong=%s)", encoded.truncated + encoded.dropped, len(encoded) + encoded.dropped,
                    data.max_length, encoded.truncated, encoded.dropped, data.overlong)


def warn_if_unknown(flat_ids: torch.Tensor, tokenizer) -> None:
    """One warning when many characters map to the unknown token (the built-in character
    tokenizer of ``random:*`` models knows only printable ASCII)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    # An unknown token that doubles as BOS/EOS would count the added specials: skip such tokenizers.
    if unk is None or unk in (tokenizer.bos_token_id, tokenizer.eos_token_id) or not len(flat_ids):
        return
    share = int((flat_ids == unk).sum()) / len(flat_ids)
    if share > UNKNOWN_SHARE_WARNING:
        log.warning("%.1f%% of the encoded tokens are the unknown token %s: the tokenizer does not know those "
                    "characters (the character tokenizer of random:* models knows only printable ASCII)",
                    100 * share, tokenizer.unk_token)
