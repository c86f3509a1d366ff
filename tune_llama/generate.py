"""Greedy, batched, left-padded generation that stops where a GSM8K answer ends, with an optional calculator.

A row stops at EOS, at a new ``Question:`` (a few-shot prompt's next problem), or after its first
``#### N`` line. With ``calculator``, a row that writes ``<<EXPR=`` gets the result computed by
``tune_llama.calculator`` and written in for it, as in Cobbe et al. (2021), and generation goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from tune_llama.calculator import calculate

STOP_STRINGS = ("Question:",)  # a new few-shot question: the answer is over (lm-eval's `until`)
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-evaluation-harness's gsm8k "strict-match"
# The whole first answer line: whatever follows it is never read by either extraction.
ANSWER_LINE = re.compile(STRICT.pattern + r"[ \t]*\n")
CALL = re.compile(r"<<([^<>=\n]*)=$")  # GSM8K's calculator annotation <<48/2=24>>, cut after its "="
TAIL_TOKENS = 64  # enough generated tokens to hold a stop string, an answer line or a whole <<EXPR=


def truncate_at_stop(text: str) -> str:
    """The output up to a stop string or through its first complete ``#### N`` line, whichever comes first."""
    cuts = [i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0]
    answer = ANSWER_LINE.search(text)
    if answer:
        cuts.append(answer.end())
    return text[:min(cuts, default=len(text))].strip()


@dataclass
class Row:
    prompt: list[int]
    new: list[int] = field(default_factory=list)
    """Tokens after the prompt: the model's and the calculator's."""
    done: bool = False


class RowWatch:
    """Per-row stopping for one ``generate`` call: EOS, the token budget, a stop string, the first
    ``#### N`` line and, with the calculator, a ``<<EXPR=`` it can compute (kept in ``results``)."""

    def __init__(self, tokenizer, rows: list[Row], width: int, max_new_tokens: int, calculator: bool):
        self.tokenizer, self.rows, self.width = tokenizer, rows, width
        self.max_new_tokens, self.calculator = max_new_tokens, calculator
        self.stopped_at: list[Optional[int]] = [None] * len(rows)
        self.results: list[Optional[str]] = [None] * len(rows)

    def __call__(self, input_ids):
        import torch

        length = input_ids.shape[1]
        start = max(0, length - TAIL_TOKENS)
        tails = input_ids[:, start:].tolist()
        for i, row in enumerate(self.rows):
            if self.stopped_at[i] is not None:
                continue
            generated = len(row.new) + length - self.width
            own = tails[i][max(0, self.width - len(row.new) - start):]  # never the prompt's few-shot answers
            if (own and own[-1] == self.tokenizer.eos_token_id) or generated >= self.max_new_tokens:
                self.stopped_at[i] = length
                continue
            text = self.tokenizer.decode(own, skip_special_tokens=True)
            call = CALL.search(text) if self.calculator else None
            self.results[i] = calculate(call.group(1)) if call else None
            if self.results[i] is not None or ANSWER_LINE.search(text) or any(s in text for s in STOP_STRINGS):
                self.stopped_at[i] = length
        return torch.tensor([s is not None for s in self.stopped_at], device=input_ids.device)


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, calculator: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` in one left-padded batch, cut by ``truncate_at_stop``.

    With ``calculator``, a row that stops at a ``<<EXPR=`` the calculator computes gets ``RESULT>>``
    appended and is generated further (the others wait finished), until every row is done.
    """
    from tune_llama.data.examples import adds_bos

    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []  # as in training: BOS + prompt tokens
    rows = [Row(bos + ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids]
    while active := [row for row in rows if not row.done]:
        watch = generate_once(model, tokenizer, active, max_new_tokens, calculator)
        for row, result in zip(active, watch.results):
            if result is not None:
                row.new += answer_ids(tokenizer, result + ">>")  # closed as GSM8K closes it: <<48/2=24>>
            row.done = result is None or len(row.new) >= max_new_tokens
            row.new = row.new[:max_new_tokens]
    return [truncate_at_stop(tokenizer.decode(row.new, skip_special_tokens=True)) for row in rows]


def generate_once(model, tokenizer, rows: list[Row], max_new_tokens: int, calculator: bool) -> RowWatch:
    """One batched ``generate`` over ``rows`` (prompt + tokens so far); adds what each row generated."""
    import torch
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class Criterion(StoppingCriteria):  # transformers wants the subclass; RowWatch does the work
        def __call__(self, input_ids, scores, **kwargs):
            return watch(input_ids)

    device = next(model.parameters()).device
    sequences = [row.prompt + row.new for row in rows]
    width = max(map(len, sequences))
    watch = RowWatch(tokenizer, rows, width, max_new_tokens, calculator)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=device)
    attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    config = GenerationConfig(max_new_tokens=max(max_new_tokens - len(row.new) for row in rows), do_sample=False,
                              num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id, use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                             stopping_criteria=StoppingCriteriaList([Criterion()]))
    for i, row in enumerate(rows):
        row.new += out[i, width:watch.stopped_at[i]].tolist()  # after a row stops, generate only pads it
    return watch


def answer_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` written mid-answer, after ``=``: a SentencePiece tokenizer encoding it
    alone would put a word-start space in front."""
    anchor = tokenizer("=", add_special_tokens=False).input_ids
    ids = tokenizer("=" + text, add_special_tokens=False).input_ids
    return ids[len(anchor):] if ids[:len(anchor)] == anchor else tokenizer(text, add_special_tokens=False).input_ids
