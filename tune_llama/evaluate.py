"""GSM8K accuracy of a model: ``python -m tune_llama.evaluate MODEL [--data SOURCE] [--limit N] [--shots K] ...``.

MODEL is an exported directory (``python -m tune_llama.export``), a hub id or
local model directory, ``embedded:smollm2`` or ``random:SHAPE``. Greedy,
batched, left-padded generation with the training prompt template (the one in
the export's ``export.json`` when there is one), optionally after K worked
examples from the train split. Answers are extracted as lm-evaluation-harness
does for GSM8K: strict (the number after ``####``) and flexible (the last
number in the output), both normalised (commas, ``$``, a trailing ``.``).
Accuracies come with a 95% Wilson score interval; one JSONL line per problem
goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from tune_llama.errors import UserError
from tune_llama.cli import run_cli
from tune_llama.spec import DataSpec, ModelSpec, SpecError, spec_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_STRINGS = ("Question:",)  # a new few-shot question: the answer is over (lm-eval's `until`)
# lm-evaluation-harness gsm8k filters: "strict-match" and "flexible-extract".
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
Z95 = 1.959964


# ---------------------------------------------------------------- answers and scores

def normalize(answer: Optional[str]) -> Optional[str]:
    """lm-eval's exact-match normalisation for GSM8K: drop commas and ``$``, a trailing ``.``, spaces."""
    if answer is None:
        return None
    answer = answer.replace(",", "").replace("$", "").strip()
    return answer[:-1] if answer.endswith(".") else answer


def extract_strict(text: str) -> Optional[str]:
    """The number after the first ``#### `` (GSM8K's answer marker), normalised; None when absent."""
    match = STRICT.search(text)
    return normalize(match.group(1)) if match else None


def extract_flexible(text: str) -> Optional[str]:
    """The last number-like token of the output, normalised; None when there is none."""
    matches = FLEXIBLE.findall(text)
    if not matches:
        return None
    return normalize(next(group for group in matches[-1] if group))


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0%, 100% and small n, unlike the normal approx)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def truncate_at_stop(text: str) -> str:
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut].strip()


# ---------------------------------------------------------------- model and prompts

@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    prompt_template: str
    data: Optional[DataSpec]
    """The data spec of the export's training run, when MODEL is an export."""


def load(name: str, device) -> Loaded:
    """Model, tokenizer and prompt template for MODEL (export dir, hub id, embedded:smollm2, random:SHAPE)."""
    import torch
    from transformers import AutoModelForCausalLM
    from tune_llama.model import load_model, load_tokenizer, resolve

    path = Path(name).expanduser()
    train_spec = read_export_spec(path)
    template = train_spec.data.prompt_template if train_spec else DataSpec().prompt_template
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name.startswith("random:"):
        spec = ModelSpec(name=name)
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, tokenizer, device)
    elif (path / "adapter_config.json").is_file():
        model, tokenizer = load_adapter(path, dtype)
    else:
        if not path.exists() and name.startswith((".", "/", "~")):
            raise UserError(f"MODEL: directory not found: {path}")
        try:
            tokenizer = load_tokenizer(ModelSpec(name=name))
            model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype)
        except OSError as err:
            raise UserError(f"MODEL: cannot load {name!r}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    model.config.use_cache = True  # training turns the KV cache off; generation needs it
    return Loaded(model, tokenizer, template, train_spec.data if train_spec else None)


def load_adapter(path: Path, dtype):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not base or base.startswith("random:"):
        raise UserError(f"MODEL: the adapter in {path} names no loadable base model; "
                        "export it merged (without --adapter-only)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer


def read_export_spec(path: Path):
    """The training spec stored in an export's ``export.json``, or None."""
    info_file = path / "export.json"
    if not info_file.is_file():
        return None
    try:
        return spec_from_dict(json.loads(info_file.read_text())["spec"])
    except (ValueError, KeyError, SpecError) as err:
        raise UserError(f"{info_file}: cannot read its spec ({str(err).splitlines()[0]})") from None


def default_data_source() -> str:
    """``../shared/gsm8k`` (from the working directory or the repository) if present, else the hub."""
    for candidate in (Path("../shared/gsm8k"), REPO_ROOT.parent / "shared" / "gsm8k"):
        if (candidate / "test.jsonl").is_file():
            return str(candidate)
    return "openai/gsm8k"


def data_spec(source: str, template: str, trained_on: Optional[DataSpec]) -> DataSpec:
    # The training run's own data spec when it is the same source, so its validation split is the same rows.
    if trained_on is not None and trained_on.source == source:
        return replace(trained_on, prompt_template=template)
    return DataSpec(source=source, prompt_template=template)


def problems_for(data: DataSpec, split: str) -> list[dict[str, str]]:
    from tune_llama.data import load_splits, load_test
    if split == "test":
        return load_test(data)
    splits = load_splits(data)
    return splits.val if split == "validation" else splits.train


def few_shot_prefix(data: DataSpec, shots: int) -> str:
    """The first K train problems, worked, each as the template followed by its full answer."""
    if shots == 0:
        return ""
    from tune_llama.data import format_prompt, load_splits
    train = load_splits(data).train
    if shots > len(train):
        raise UserError(f"--shots: {shots} is more than the {len(train)} training problems of {data.source}")
    return "".join(format_prompt(data.prompt_template, p["question"]) + p["answer"] + "\n\n" for p in train[:shots])


# ---------------------------------------------------------------- generation

def stop_criterion(tokenizer, prompt_length: int):
    """Stop each row once its generated text holds a stop string (EOS is handled by generate itself)."""
    import torch
    from transformers import StoppingCriteria

    class StopAtString(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            start = max(prompt_length, input_ids.shape[1] - 16)  # the tail is enough to see a new stop string
            tails = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in STOP_STRINGS) for t in tails], device=input_ids.device)

    return StopAtString()


def generate_batch(loaded: Loaded, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    """Greedy continuations of ``prompts``, left-padded into one batch, cut at a stop string."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList
    from tune_llama.data.examples import adds_bos

    tok = loaded.tokenizer
    bos = [tok.bos_token_id] if adds_bos(tok) else []  # as in training: BOS + prompt tokens
    ids = [bos + row for row in tok(prompts, add_special_tokens=False).input_ids]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(row)) + row for row in ids], device=device)
    attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              bos_token_id=tok.bos_token_id, use_cache=True)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                    stopping_criteria=StoppingCriteriaList([stop_criterion(tok, width)]))
    return [truncate_at_stop(text) for text in tok.batch_decode(out[:, width:], skip_special_tokens=True)]


# ---------------------------------------------------------------- the evaluation

def evaluate(model: str, data: Optional[str] = None, split: str = "test", limit: Optional[int] = None,
             batch_size: int = 8, shots: int = 0, max_new_tokens: int = 256, out: Optional[Path] = None,
             device: str = "auto") -> dict[str, Any]:
    """Generate, extract, score; write the JSONL; return the summary (also printed)."""
    from tqdm.auto import tqdm
    from tune_llama.data import final_answer, format_prompt
    from tune_llama.loop import pick_device, seed_everything

    seed_everything(0)
    torch_device = pick_device(device)
    source = data or default_data_source()
    loaded = load(model, torch_device)
    dspec = data_spec(source, loaded.prompt_template, loaded.data)
    problems = problems_for(dspec, split)[:limit]
    if not problems:
        raise UserError(f"--split: {source} has no {split} problems")
    prefix = few_shot_prefix(dspec, shots)
    prompts = [prefix + format_prompt(dspec.prompt_template, p["question"]) for p in problems]

    lengths = [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # similar lengths share a batch: less padding
    outputs: list[Optional[str]] = [None] * len(prompts)
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generating", unit="problem", mininterval=10)
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        for index, text in zip(batch, generate_batch(loaded, [prompts[j] for j in batch], max_new_tokens,
                                                     torch_device)):
            outputs[index] = text
        bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - start

    out = out or default_out(model, source, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("w", encoding="utf-8") as f:
        for index, (problem, text) in enumerate(zip(problems, outputs)):
            gold = normalize(final_answer(problem["answer"]))
            strict, flexible = extract_strict(text), extract_flexible(text)
            row = {"index": index, "question": problem["question"], "generated": text,
                   "strict": strict, "flexible": flexible, "gold": gold,
                   "correct_strict": strict == gold, "correct_flexible": flexible == gold}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
    summary = summarize(rows, model=model, data=source, split=split, shots=shots, max_new_tokens=max_new_tokens,
                        prompt_template=dspec.prompt_template, seconds=elapsed, out=out)
    print_summary(summary)
    return summary


def summarize(rows: list[dict], **info) -> dict[str, Any]:
    n = len(rows)
    summary: dict[str, Any] = {**{k: str(v) if isinstance(v, Path) else v for k, v in info.items()}, "n": n}
    for kind in ("strict", "flexible"):
        correct = sum(r[f"correct_{kind}"] for r in rows)
        low, high = wilson_interval(correct, n)
        summary[kind] = {"correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [low, high]}
    summary["problems_per_s"] = n / summary["seconds"] if summary.get("seconds") else None
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(f"{s['model']} on {s['data']} {s['split']} ({s['n']} problems, {s['shots']}-shot, "
          f"{s['seconds']:.0f} s, {s['problems_per_s']:.2f} problems/s)")
    for kind, label in (("strict", "strict-match (#### N)"), ("flexible", "flexible-extract (last number)")):
        m = s[kind]
        print(f"  {label:<31} {m['accuracy']:7.2%}  ({m['correct']}/{s['n']}; 95% Wilson CI "
              f"{m['ci95'][0]:.1%} - {m['ci95'][1]:.1%})")
    print(f"  per-problem results: {s['out']}")


def default_out(model: str, source: str, split: str) -> Path:
    path = Path(model).expanduser()
    name = "-".join(path.resolve().parts[-2:]) if path.is_dir() else model
    slug = lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")  # noqa: E731
    return Path("results") / "eval" / f"{slug(name)}-{slug(Path(source).name or source)}-{split}.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_llama.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="exported directory, hub id, embedded:smollm2 or random:tiny")
    parser.add_argument("--data", help="synthetic, a directory with test.jsonl/train.jsonl, or a hub id "
                                       "(default: ../shared/gsm8k if present, else openai/gsm8k)")
    parser.add_argument("--split", choices=("test", "validation", "train"), default="test")
    parser.add_argument("--limit", type=positive, help="only the first N problems")
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--shots", type=non_negative, default=0, help="worked train examples before each question")
    parser.add_argument("--max-new-tokens", type=positive, default=256)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, help="JSONL file (default results/eval/MODEL-DATA-SPLIT.jsonl)")
    args = parser.parse_args(argv)
    evaluate(args.model, args.data, args.split, args.limit, args.batch_size, args.shots, args.max_new_tokens,
             args.out, args.device)
    return 0


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


if __name__ == "__main__":
    run_cli(main)
