"""``python -m tune_llama.data stats SPEC``: split sizes, over-length examples, token lengths and padding
of a spec's data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from tune_llama.cli import add_set_argument
from tune_llama.data.batching import make_batches, real_token_share
from tune_llama.data.examples import Encoded, encode
from tune_llama.data.sources import Splits, load_splits, load_test
from tune_llama.errors import UserError
from tune_llama.model import load_tokenizer
from tune_llama.spec import load_spec


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def pct(q: float) -> int:  # nearest rank
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    return {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1), "p50": pct(50),
            "p90": pct(90), "p99": pct(99), "max": ordered[-1]}


def stats(spec_path: str, overrides: list[str]) -> dict:
    spec = load_spec(spec_path, overrides)
    data = spec.data
    tokenizer = load_tokenizer(spec.model)
    splits = load_splits(data)
    problems = {"train": splits.train, "val": splits.val}
    encoded: dict[str, Encoded] = {name: encode(rows, tokenizer, data) for name, rows in problems.items()}
    shares = {}
    for mode in dict.fromkeys([data.batching, "random"]):
        batches = make_batches(encoded["train"], dataclasses.replace(data, batching=mode),
                               tokenizer.pad_token_id, seed=spec.training.seed, epoch=0)
        shares[mode] = round(real_token_share(batches), 4)
    return {
        "source": data.source,
        "tokenizer": spec.model.tokenizer or spec.model.name,
        "max_length": data.max_length,
        "overlong": data.overlong,
        "batch_size": data.batch_size,
        "splits": {
            **{name: {"problems": len(problems[name]), "examples": len(enc), "truncated": enc.truncated,
                      "dropped": enc.dropped, "tokens": length_stats(enc.lengths)}
               for name, enc in encoded.items()},
            "test": {"problems": count_test(splits)},
        },
        "real_token_share": shares,
    }


def count_test(splits: Splits) -> int | None:
    """Test problems, or None for a source without a test split (a local folder of train rows alone: training
    does not need it), whatever its form: test.jsonl, a hub download's parquet shards, the embedded slice."""
    try:
        return len(load_test(splits.data))
    except UserError:
        return None


def print_report(report: dict) -> None:
    print(f"source {report['source']}  tokenizer {report['tokenizer']}  "
          f"max_length {report['max_length']} ({report['overlong']})  batch_size {report['batch_size']}")
    for name, split in report["splits"].items():
        if split["problems"] is None:
            print(f"{name:>5}: no test split (neither test.jsonl nor a hub download's test shards)")
            continue
        line = f"{name:>5}: {split['problems']:>6} problems"
        if "tokens" in split:
            tokens = "  ".join(f"{k} {v}" for k, v in split["tokens"].items())
            line += f"  truncated {split['truncated']}  dropped {split['dropped']}  tokens: {tokens}"
        print(line)
    shares = "  ".join(f"{mode} {share:.3f}" for mode, share in report["real_token_share"].items())
    print(f"real-token share of train batches: {shares}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", required=True)
    stats_parser = commands.add_parser("stats", help="split sizes, token lengths, padding")
    stats_parser.add_argument("spec", help="YAML spec file")
    add_set_argument(stats_parser)
    stats_parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    report = stats(args.spec, args.overrides)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":  # python -m tune_llama.data is tune-llama data
    from tune_llama.__main__ import run_command
    run_command("data")
