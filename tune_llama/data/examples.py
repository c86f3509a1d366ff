"""Turn problems into token ids and labels: the loss falls only on the answer and EOS."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tune_llama.spec import DataSpec, SpecError

IGNORE_INDEX = -100  # the label torch's cross-entropy (and HF models) skip

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Token ids and labels, one 1-D int64 tensor per example (batching pads them in C++)."""

    input_ids: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    truncated: int = 0
    """Examples cut at ``data.max_length`` (they lose their EOS and answer tail)."""

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
    """Prompt ids + answer ids + EOS, labels -100 on the prompt; truncated to ``data.max_length``.

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

    longest = len(bos) + max(map(len, prompt_ids))
    if longest >= data.max_length:
        raise SpecError("data.max_length", f"{data.max_length} is smaller than the longest prompt "
                                           f"({longest} tokens) plus one answer token; use at least {longest + 1}")
    ids, labels, lengths, truncated = [], [], [], 0
    for prompt, answer in zip(prompt_ids, answer_ids):
        prompt = bos + prompt
        target = answer + eos
        n = min(len(prompt) + len(target), data.max_length)
        truncated += n < len(prompt) + len(target)
        ids += (prompt + target)[:n]
        labels += ([IGNORE_INDEX] * len(prompt) + target)[:n]
        lengths.append(n)
    # One tensor split into per-example views: far faster than a torch.tensor call per example.
    out = Encoded(list(torch.tensor(ids).split(lengths)), list(torch.tensor(labels).split(lengths)), truncated)
    warn_if_truncated(out, data)
    return out


def warn_if_truncated(encoded: Encoded, data: DataSpec) -> None:
    if encoded.truncated:
        log.warning("%d of %d examples are longer than data.max_length=%d and were truncated",
                    encoded.truncated, len(encoded), data.max_length)
