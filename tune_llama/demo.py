"""``make demo``: the whole story on real GSM8K problems, on CPU, offline, in a few minutes.

Searches the embedded SmolLM2 with LoRA on the embedded GSM8K slice
(``search_spaces/demo.yaml``), exports the best trial, scores the base model
and the exported one on the same test problems, writes the report, and ends
with a "what happened" block.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tune_llama.cli import add_search_folder_arguments, add_set_argument, shell_path

BASE_MODEL = "embedded:smollm2"
DATA = "embedded:gsm8k-mini"


def accuracy_line(before: dict, after: dict) -> str:
    def cell(summary: dict, kind: str) -> str:
        return f"{summary[kind]['correct']}/{summary['n']}"
    return (f"accuracy before -> after: strict {cell(before, 'strict')} -> {cell(after, 'strict')}, "
            f"flexible {cell(before, 'flexible')} -> {cell(after, 'flexible')} "
            f"({after['n']} GSM8K test problems)")


def format_line(before: Path, after: Path) -> str:
    """How many outputs end in GSM8K's answer format (``#### N``): what a small model learns first."""
    def count(path: Path) -> str:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return f"{sum(r['strict'] is not None for r in rows)}/{len(rows)}"
    return f"answers in GSM8K's '#### N' format before -> after: {count(before)} -> {count(after)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default="search_spaces/demo.yaml", help="the demo's spec (default %(default)s)")
    parser.add_argument("--test-problems", type=int, default=12, help="test problems scored before and after")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="generation cap per answer when scoring")
    add_search_folder_arguments(parser)
    add_set_argument(parser)


def main(args: argparse.Namespace) -> int:
    from tune_llama import search
    from tune_llama.__main__ import command
    from tune_llama.evaluate import gsm8k_accuracy
    from tune_llama.export import EXPORT_FILE, export
    from tune_llama.report import write_report

    name = args.name or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()

    search_args = [args.spec, "--name", name, *sum((["--set", o] for o in args.overrides), [])]
    if args.storage:
        search_args += ["--storage", str(args.storage)]
    code = command("search")(search_args)
    search_dir = search.search_dir_for(args.storage, name)
    if code != 0:
        return code
    out = export(search_dir)
    info = json.loads((out / EXPORT_FILE).read_text())
    scores = {}
    for label, model in (("base", BASE_MODEL), ("fine-tuned", str(out))):
        print(f"\nscoring the {label} model on {args.test_problems} GSM8K test problems ...", flush=True)
        scores[label] = gsm8k_accuracy(model, data=DATA, split="test", limit=args.test_problems,
                                       max_new_tokens=args.max_new_tokens, device="cpu",
                                       out=search_dir / f"eval-{label}.jsonl")
    write_report(search_dir)
    where = shell_path(search_dir)
    print("\n" + "\n".join([
        "=" * 30 + " what happened " + "=" * 30,
        f"searched {info['spec']['search']['num_samples']} configs of {BASE_MODEL} (LoRA) on {DATA}, exported "
        f"the best and scored it before and after: {time.perf_counter() - start:.0f} s",
        f"best config: {json.dumps(info['params'])}",
        f"its validation loss: {info['metric']['value']:.4f} at epoch {info['epoch']:g} "
        f"(perplexity {info['metrics']['eval_perplexity']:.2f})",
        accuracy_line(scores["base"], scores["fine-tuned"]),
        format_line(search_dir / "eval-base.jsonl", search_dir / "eval-fine-tuned.jsonl"),
        f"report: {where}/report/report.html  (table: tune-llama report {where})",
        f"exported model: {os.path.relpath(out)}",
        f"resume:   tune-llama search --resume {where}",
        f"export:   tune-llama export {where}",
        f"evaluate: tune-llama evaluate {shell_path(out)} --data {DATA} --limit {args.test_problems}",
    ]))
    return 0


if __name__ == "__main__":  # python -m tune_llama.demo is tune-llama demo
    from tune_llama.__main__ import run_command
    run_command("demo")
