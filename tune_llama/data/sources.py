"""Where GSM8K problems come from (synthetic, embedded, a local directory, the hub) and how they are split.

A local directory holds ``train.jsonl`` (and ``test.jsonl``), or is a hub download of the data
set (``hf download openai/gsm8k --repo-type dataset --local-dir DIR``): parquet files in one folder
per configuration, ``DIR/main/train-00000-of-00001.parquet``; ``data.config`` picks the folder,
and DIR may also be that folder itself.

A problem is a dict ``{"question": str, "answer": str}``. Validation rows are
carved from train with ``split_seed``; the test split is returned untouched and
read only when asked for (a local directory may hold train.jsonl alone).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tune_llama.errors import UserError
from tune_llama.paths import relative_note
from tune_llama.data import synthetic
from tune_llama.spec import DataSpec, SpecError

Problem = dict[str, str]

EMBEDDED = {"embedded:gsm8k-mini": Path(__file__).resolve().parent / "gsm8k_mini"}
"""Data sets shipped inside the package (package data): name -> folder with train.jsonl and test.jsonl."""


@dataclass
class Splits:
    train: list[Problem]
    val: list[Problem]
    data: DataSpec = field(repr=False, compare=False)

    @cached_property
    def test(self) -> list[Problem]:
        """Read on first use only: training needs no test file."""
        return load_test(self.data)


def final_answer(answer_text: str) -> str:
    """The final answer of a GSM8K answer: the text after ``####``, stripped."""
    return answer_text.rpartition("####")[2].strip()


def load_splits(data: DataSpec) -> Splits:
    """Train/validation problems for a data spec (``test`` is read when first used)."""
    train, val = split_train(_load(data, "train"), data)
    return Splits(train=train, val=val, data=data)


def load_test(data: DataSpec) -> list[Problem]:
    """The test problems of a data spec (for the synthetic source, its own fixed test split)."""
    return _load(data, "test")


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

def _load(data: DataSpec, split: str) -> list[Problem]:
    """The rows of one split (``train`` or ``test``) of the source, before the validation split."""
    if data.source == "synthetic":
        if split == "test":
            return synthetic.generate_test()  # fixed, whatever the seed; skips generating train rows
        return synthetic.generate_train(data.synthetic_size, data.split_seed)
    if data.source.startswith("embedded:"):
        return _load_embedded(data.source, split)
    if Path(data.source).expanduser().is_dir() or _looks_like_path(data.source):
        return _load_local(Path(data.source).expanduser(), split, data.config)
    return _load_hub(data, split)


def _load_embedded(source: str, split: str) -> list[Problem]:
    if source not in EMBEDDED:
        raise SpecError("data.source", f"unknown embedded data set {source!r}; "
                                       f"shipped: {', '.join(sorted(EMBEDDED))}")
    path = EMBEDDED[source] / f"{split}.jsonl"
    if not path.is_file():  # an install without the package data
        raise UserError(f"data.source: {source} is not installed: {path} not found")
    return _read_jsonl(path)


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is a mistyped directory, so say "not found".
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _load_local(root: Path, split: str, config: str) -> list[Problem]:
    if not root.is_dir():
        raise UserError(f"data.source: directory not found: {root}{relative_note(str(root))}")
    path = root / f"{split}.jsonl"
    if path.is_file():
        return _read_jsonl(path)
    pattern = f"{split}-*.parquet"  # the hub's shards: train-00000-of-00001.parquet, ...
    if shards := sorted((root / config).glob(pattern)):
        return _read_parquet(shards)
    if shards := sorted(root.glob(pattern)):
        if root.name != config and (root.parent / config).is_dir():
            # DIR/socratic given with data.config main: the rows would not be the configuration recorded.
            raise SpecError("data.config", f"{config!r}, but data.source {root} is the {root.name!r} folder of a "
                                           f"hub download: set data.config: {root.name}, or data.source: {root.parent}")
        return _read_parquet(shards)
    need = "training needs" if split == "train" else "the test split is read from"
    configs = sorted({p.parent.name for p in root.glob(f"*/{pattern}")})
    hint = f"; data.config is one of: {', '.join(configs)}" if configs else ""
    raise UserError(f"data.source: found neither {path} nor a hub download's {root / config / pattern} "
                    f"(a local source: {need} one of them){hint}")


def _read_jsonl(path: Path) -> list[Problem]:
    """Every line parsed (blank lines skipped); a bad line is an error naming ``path:line``."""
    rows = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is a bad line too, not a traceback
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_problem(json.loads(line.decode("utf-8"))))
            except (ValueError, TypeError, KeyError):
                raise UserError(f"data.source: {path}:{number}: not a JSON object with "
                                f"string fields question and answer") from None
    return rows


def _read_parquet(shards: list[Path]) -> list[Problem]:
    try:
        import pyarrow.parquet as pq  # lazy: only hub downloads need it (datasets brings it; the GPU image has it)
    except ImportError:
        raise UserError(f"data.source: reading {shards[0]} needs pyarrow: pip install pyarrow") from None
    rows = []
    for path in shards:
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"data.source: {path}: not a readable parquet file ({reason})") from None
        missing = {"question", "answer"} - set(table.column_names)
        if missing:
            raise UserError(f"data.source: {path}: no column {' or '.join(sorted(missing))} "
                            f"(has {', '.join(table.column_names)})")
        for number, row in enumerate(table.select(["question", "answer"]).to_pylist(), 1):
            try:
                rows.append(_problem(row))
            except TypeError:
                raise UserError(f"data.source: {path}: row {number}: question and answer must be strings") from None
    return rows


def _load_hub(data: DataSpec, split: str) -> list[Problem]:
    try:
        import datasets  # lazy: the GPU image has no `datasets`
    except ImportError:
        raise UserError(f"data.source: {data.source!r} is read as a hub id, which needs the "
                        f"`datasets` package (or give a local directory, or synthetic)") from None
    try:
        return [_problem(r) for r in datasets.load_dataset(data.source, data.config, split=split)]
    except Exception as err:  # network, unknown id or config, missing split or field: all one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"data.source: cannot load hub data set {data.source!r} "
                        f"(data.config {data.config!r}): {reason}") from None


def _problem(row: dict) -> Problem:
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise TypeError("question and answer must be strings")
    return {"question": question, "answer": answer}
