"""GSM8K accuracy of a model: ``python -m tune_llama.evaluate MODEL [--data SOURCE] [--limit N] [--shots K] ...``.

MODEL is an exported directory (``python -m tune_llama.export``), a hub id or
local model directory, ``embedded:smollm2`` or ``random:SHAPE``; ``score``
does the same for a model already in memory. Greedy, batched, left-padded
generation with the training prompt template (the one in the export's
``export.json`` when there is one), optionally after K worked examples from
the train split. A row stops at EOS, at a new ``Question:`` or after its first
``#### N`` line. With ``--calculator`` the arithmetic in ``<<EXPR=`` is done
by ``tune_llama.calculator`` and written in for the model, as in Cobbe et al.
(2021). Answers are extracted as lm-evaluation-harness does for GSM8K: strict
(the number after ``####``) and flexible (the last number in the output), both
normalised (commas, ``$``, a trailing ``.``). Accuracies come with a 95% Wilson
score interval; one JSONL line per problem goes to ``--out`` (default: beside the model, in
``MODEL/eval/``; ``default_out``). SOURCE defaults
to ``$TUNE_LLAMA_GSM8K`` when set, else the hub's ``openai/gsm8k``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from tune_llama.errors import SpecError, UserError
from tune_llama.generate import STRICT, generate_texts
from tune_llama.paths import missing_folder, relative_note
from tune_llama.spec import DataSpec, ModelSpec, spec_from_dict

DATA_VARIABLE = "TUNE_LLAMA_GSM8K"
HUB_GSM8K = "openai/gsm8k"
# lm-evaluation-harness gsm8k filters: "strict-match" and "flexible-extract".
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


# ---------------------------------------------------------------- model and prompts

@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    prompt_template: str
    data: Optional[DataSpec]
    """The data spec of the export's training run, when MODEL is an export."""


def load(name: str, device) -> LoadedModel:
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
        try:
            tokenizer = load_tokenizer(ModelSpec(name=name))
            model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype)
        except OSError as err:
            raise UserError(f"MODEL: cannot load {name!r}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, template, train_spec.data if train_spec else None)


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
    """``$TUNE_LLAMA_GSM8K`` when set (a local copy), else the hub's GSM8K."""
    return os.environ.get(DATA_VARIABLE) or HUB_GSM8K


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


# ---------------------------------------------------------------- scoring

def score(model, tokenizer, problems: list[dict[str, str]], prompt_template: str, *, batch_size: int = 8,
          max_new_tokens: int = 256, calculator: bool = False, prefix: str = "",
          out: Optional[Path] = None) -> dict[str, Any]:
    """GSM8K accuracy of a model in memory on ``problems`` (``{"question", "answer"}`` dicts).

    Each prompt is ``prefix`` (worked examples) + ``prompt_template`` filled with the question.
    Returns n, strict and flexible ``{correct, accuracy, ci95, per_problem}``, seconds, problems_per_s,
    calculator, max_new_tokens, prompt_template and out; writes one JSONL line per problem to
    ``out`` when given. The model is put in eval mode with its KV cache on for the call only.
    """
    from tune_llama.data import final_answer, format_prompt
    from tune_llama.progress_bar import Progress

    if out is not None:
        out = Path(out)
        check_writable(out)  # before the slow part, not after it
    prompts = [prefix + format_prompt(prompt_template, p["question"]) for p in problems]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    was_training, used_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True  # training turns the KV cache off; generation needs it
    start = time.perf_counter()
    try:
        with Progress(len(prompts), "generating", "problem") as bar:  # plain lines when not a terminal
            for i in range(0, len(order), batch_size):
                batch = order[i:i + batch_size]
                texts = generate_texts(model, tokenizer, [prompts[j] for j in batch], max_new_tokens, calculator)
                for index, text in zip(batch, texts):
                    outputs[index] = text
                bar.update(len(batch))
    finally:
        model.train(was_training)
        model.config.use_cache = used_cache
    elapsed = time.perf_counter() - start

    rows = []
    for index, (problem, text) in enumerate(zip(problems, outputs)):
        gold = normalize(final_answer(problem["answer"]))
        strict, flexible = extract_strict(text), extract_flexible(text)
        rows.append({"index": index, "question": problem["question"], "generated": text,
                     "strict": strict, "flexible": flexible, "gold": gold,
                     "correct_strict": strict == gold, "correct_flexible": flexible == gold})
    if out is not None:
        out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return accuracy_summary(rows, calculator=calculator, max_new_tokens=max_new_tokens, prompt_template=prompt_template,
                     seconds=elapsed, out=out)


def gsm8k_accuracy(model: str, data: Optional[str] = None, split: str = "test", limit: Optional[int] = None,
                   batch_size: int = 8, shots: int = 0, max_new_tokens: int = 256, out: Optional[Path] = None,
                   device: str = "auto", calculator: bool = False) -> dict[str, Any]:
    """Load MODEL, score it on a split of ``data`` (default ``default_data_source()``), write the JSONL,
    print and return the summary (``score``'s, plus model, data, split and shots)."""
    if missing_folder(model) is not None:  # a mistyped folder: said before any model code loads or the hub is asked
        raise UserError(f"MODEL: directory not found: {missing_folder(model)}{relative_note(model)}")
    from tune_llama.loop import pick_device, seed_everything

    seed_everything(0)
    torch_device = pick_device(device)
    source = data or default_data_source()
    loaded = load(model, torch_device)
    dspec = data_spec(source, loaded.prompt_template, loaded.data)
    try:
        problems = problems_for(dspec, split)[:limit]
        prefix = few_shot_prefix(dspec, shots)
    except UserError as err:  # the loaders name the spec field; here the user set a flag or the variable
        flag = DATA_VARIABLE if not data and os.environ.get(DATA_VARIABLE) else "--data"
        raise UserError(re.sub(r"^data\.source:", f"{flag}:", str(err))) from None
    if not problems:
        raise UserError(f"--split: {source} has no {split} problems")
    summary = {"model": model, "data": source, "split": split, "shots": shots,
               **score(loaded.model, loaded.tokenizer, problems, dspec.prompt_template, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, calculator=calculator, prefix=prefix,
                       out=out or default_out(model, source, split, limit, shots, calculator))}
    print_summary(summary)
    return summary




def check_writable(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.open("a").close()
    except OSError as err:
        raise UserError(f"--out: cannot write {out}: {err.strerror or err}") from None


def accuracy_summary(rows: list[dict], **info) -> dict[str, Any]:
    n = len(rows)
    summary: dict[str, Any] = {**{k: str(v) if isinstance(v, Path) else v for k, v in info.items()}, "n": n}
    for kind in ("strict", "flexible"):
        correct = sum(r[f"correct_{kind}"] for r in rows)
        low, high = wilson_interval(correct, n)
        # per_problem: kept so that two models scored on the same problems can be compared pairwise (paired.py)
        summary[kind] = {"correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [low, high],
                         "per_problem": [bool(r[f"correct_{kind}"]) for r in rows]}
    summary["problems_per_s"] = n / summary["seconds"] if summary.get("seconds") else None
    return summary


def print_summary(s: dict[str, Any]) -> None:
    calculator = ", calculator" if s.get("calculator") else ""
    print(f"{s['model']} on {s['data']} {s['split']} ({s['n']} problems, {s['shots']}-shot{calculator}, "
          f"{s['seconds']:.0f} s, {s['problems_per_s']:.2f} problems/s)")
    for kind, label in (("strict", "strict-match (#### N)"), ("flexible", "flexible-extract (last number)")):
        m = s[kind]
        print(f"  {label:<31} {m['accuracy']:7.2%}  ({m['correct']}/{s['n']}; 95% Wilson CI "
              f"{m['ci95'][0]:.1%} - {m['ci95'][1]:.1%})")
    print(f"  per-problem results: {s['out']}")


EVAL_DIR = "eval"
"""Beside the model it scored: ``MODEL/eval/`` holds one JSONL per evaluation of that model."""


def default_out(model: str, source: str, split: str, limit: Optional[int] = None, shots: int = 0,
                calculator: bool = False) -> Path:
    """Where the per-problem results go without ``--out``: beside the model they score, ``MODEL/eval/DATA-SPLIT
    [-limitN][-Kshot][-calculator].jsonl``, when MODEL is a local folder this user can write (an export, a run's
    ``best/``); else ``results/eval/MODEL-...`` under the working folder (a hub id, a built-in model, a shared
    read-only folder). The name tells apart evaluations with other settings, so none overwrites another."""
    slug = lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")  # noqa: E731
    run = (f"{slug(Path(source).name or source)}-{split}" + (f"-limit{limit}" if limit else "")
           + (f"-{shots}shot" if shots else "") + ("-calculator" if calculator else "") + ".jsonl")
    path = Path(model).expanduser()
    if path.is_dir() and writable(path / EVAL_DIR if (path / EVAL_DIR).is_dir() else path):
        return path / EVAL_DIR / run
    name = "-".join(path.resolve().parts[-2:]) if path.is_dir() else model
    return Path("results") / "eval" / f"{slug(name)}-{run}"


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m tune_llama.evaluate`` (and of ``tune-llama evaluate``)."""
    parser.add_argument("model", help="exported directory, hub id, embedded:smollm2 or random:tiny")
    parser.add_argument("--data", help="synthetic, embedded:gsm8k-mini, a directory with test.jsonl/train.jsonl, "
                                       f"or a hub id (default: ${DATA_VARIABLE} if set, else {HUB_GSM8K})")
    parser.add_argument("--split", choices=("test", "validation", "train"), default="test",
                        help="which problems: the published test split (default), or the validation rows carved "
                             "from train by the export's data.split_seed (never trained on), or train")
    parser.add_argument("--limit", type=positive, help="only the first N problems")
    parser.add_argument("--batch-size", type=positive, default=8,
                        help="problems generated at once (default 8); lower it if memory runs out")
    parser.add_argument("--shots", type=non_negative, default=0,
                        help="worked train examples put before each question (few-shot prompting; default 0)")
    parser.add_argument("--max-new-tokens", type=positive, default=256,
                        help="longest answer generated (default 256); generation also stops at the '#### N' line")
    parser.add_argument("--calculator", action="store_true",
                        help="compute each <<EXPR= the model writes and write the result in for it")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run: auto (default) takes the GPU when there is one, else the CPU")
    parser.add_argument("--out", type=Path, help="JSONL file (default: beside the model, MODEL/eval/DATA-SPLIT.jsonl; "
                                                 "results/eval/ for a hub id or a folder you cannot write)")


def main(args: argparse.Namespace) -> int:
    gsm8k_accuracy(args.model, args.data, args.split, args.limit, args.batch_size, args.shots, args.max_new_tokens,
                   args.out, args.device, calculator=args.calculator)
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


if __name__ == "__main__":  # python -m tune_llama.evaluate is tune-llama evaluate
    from tune_llama.__main__ import run_command
    run_command("evaluate")
