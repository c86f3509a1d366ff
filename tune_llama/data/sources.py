"""Where GSM8K problems come from (synthetic, a local directory, the hub) and how they are split.

A problem is a dict ``{"question": str, "answer": str}``. Validation rows are
carved from train with ``split_seed``; the test split is returned untouched.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tune_llama.errors import UserError
from tune_llama.data import synthetic
from tune_llama.spec import DataSpec, SpecError

Problem = dict[str, str]


@dataclass
class Splits:
    train: list[Problem]
    val: list[Problem]
    test: list[Problem]


def final_answer(answer_text: str) -> str:
    """The final answer of a GSM8K answer: the text after ``####``, stripped."""
    return answer_text.rpartition("####")[2].strip()


def load_splits(data: DataSpec) -> Splits:
    """Train/validation/test problems for a data spec."""
    train, test = _load(data)
    train, val = split_train(train, data)
    return Splits(train=train, val=val, test=test)


def load_test(data: DataSpec) -> list[Problem]:
    """The test problems of a data spec (for the synthetic source, its own fixed test split)."""
    if data.source == "synthetic":
        return synthetic.generate_test()  # skip generating the train rows
    return _load(data)[1]


def split_train(train: list[Problem], data: DataSpec) -> tuple[list[Problem], list[Problem]]:
    """(train, val): ``val_size`` rows drawn with ``split_seed``, then the first ``train_size`` others."""
    if data.val_size >= len(train):
        raise SpecError("data.val_size", f"{data.val_size} leaves no training rows: "
                                         f"{data.source} has {len(train)} training problems")
    order = list(range(len(train)))
    random.Random(data.split_seed).shuffle(order)
    val_ids = set(order[: data.val_size])
    val = [train[i] for i in order[: data.val_size]]
    rest = [row for i, row in enumerate(train) if i not in val_ids]  # keep file order: "first N" is meaningful
    return rest[: data.train_size], val


# ---------------------------------------------------------------- sources

def _load(data: DataSpec) -> tuple[list[Problem], list[Problem]]:
    """(train, test) rows of the source, before the validation split."""
    if data.source == "synthetic":
        return synthetic.generate_train(data.synthetic_size, data.split_seed), synthetic.generate_test()
    if Path(data.source).expanduser().is_dir() or _looks_like_path(data.source):
        return _load_local(Path(data.source).expanduser())
    return _load_hub(data)


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is a mistyped directory, so say "not found".
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _load_local(root: Path) -> tuple[list[Problem], list[Problem]]:
    if not root.is_dir():
        raise UserError(f"data.source: directory not found: {root}")
    return _read_jsonl(root / "train.jsonl"), _read_jsonl(root / "test.jsonl")


def _read_jsonl(path: Path) -> list[Problem]:
    if not path.is_file():
        raise UserError(f"data.source: {path} not found (a local source needs train.jsonl and test.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_problem(json.loads(line)))
            except (ValueError, TypeError, KeyError):
                raise UserError(f"data.source: {path}:{number}: not a JSON object with "
                                f"string fields question and answer") from None
    return rows


def _load_hub(data: DataSpec) -> tuple[list[Problem], list[Problem]]:
    try:
        import datasets  # lazy: the GPU image has no `datasets`
    except ImportError:
        raise UserError(f"data.source: {data.source!r} is read as a hub id, which needs the "
                        f"`datasets` package (or give a local directory, or synthetic)") from None
    try:
        ds = datasets.load_dataset(data.source, data.config)
        return [_problem(r) for r in ds["train"]], [_problem(r) for r in ds["test"]]
    except Exception as err:  # network, unknown id or config, missing split or field: all one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"data.source: cannot load hub data set {data.source!r} "
                        f"(data.config {data.config!r}): {reason}") from None


def _problem(row: dict) -> Problem:
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise TypeError("question and answer must be strings")
    return {"question": question, "answer": answer}
