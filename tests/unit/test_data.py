"""The GSM8K data package: sources, splits, encoding, batching and the stats CLI."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import operator
import os
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest
import torch

from tune_llama.errors import UserError
from tune_llama.data import (IGNORE_INDEX, Encoded, count_batches, encode, final_answer, format_prompt, load_splits,
                             load_test, make_batches, real_token_share)
from tune_llama.data import synthetic
from tune_llama.data.sources import EMBEDDED, split_train
from tune_llama.__main__ import run_command
from tune_llama.model import char_tokenizer as build_char_tokenizer
from tune_llama.spec import DataSpec, SpecError, load_spec

ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def exact_eval(expr: str) -> Fraction:
    """+ - * / over integer literals, exactly; anything else raises."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"not plain arithmetic: {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def numbered(n: int, prefix: str) -> list[dict[str, str]]:
    return [{"question": f"{prefix} question {i}?", "answer": f"It is {i}.\n#### {i}"} for i in range(n)]


@pytest.fixture
def local_source(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(40, "train"))
    write_jsonl(tmp_path / "test.jsonl", numbered(7, "test"))
    return tmp_path


@pytest.fixture(scope="module")
def problems() -> list[dict[str, str]]:
    return synthetic.generate(120, seed=7)


def rows_of(batches) -> list[tuple[int, ...]]:
    """The unpadded input rows of a list of batches, in order."""
    return [tuple(ids[mask.bool()].tolist())
            for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]


# ---------------------------------------------------------------- sources

def test_synthetic_annotations_are_exact_and_final_answer_is_the_last_value():
    step_counts = Counter()
    for p in synthetic.generate(500, seed=3):
        steps = ANNOTATION.findall(p["answer"])
        step_counts[len(steps)] += 1
        for expr, value in steps:
            assert exact_eval(expr) == Fraction(value), (expr, value, p["question"])
        assert final_answer(p["answer"]) == steps[-1][1]
        assert p["answer"].splitlines()[-1] == f"#### {steps[-1][1]}"
    assert set(step_counts) == {2, 3, 4}


def test_synthetic_source_is_seeded_by_split_seed_and_its_test_split_is_fixed_and_disjoint():
    data = DataSpec(source="synthetic", synthetic_size=150, val_size=30)
    splits = load_splits(data)
    assert (len(splits.train), len(splits.val)) == (120, 30)
    assert load_splits(data) == splits
    other = load_splits(dataclasses.replace(data, split_seed=99))
    assert other.train != splits.train
    assert other.test == splits.test == load_test(data) == synthetic.generate_test()
    seen = {p["question"] for p in splits.train + splits.val}
    assert len(seen) == 150 and not seen & {p["question"] for p in splits.test}


def test_validation_split_is_disjoint_from_train_deterministic_and_leaves_test_untouched(local_source):
    data = DataSpec(source=str(local_source), val_size=6, split_seed=5)
    splits = load_splits(data)
    train_q = [p["question"] for p in splits.train]
    val_q = [p["question"] for p in splits.val]
    assert len(val_q) == 6 and not set(train_q) & set(val_q)
    assert sorted(train_q + val_q) == sorted(p["question"] for p in numbered(40, "train"))
    assert load_splits(data) == splits
    assert load_splits(dataclasses.replace(data, split_seed=6)).val != splits.val
    assert splits.test == load_test(data) == numbered(7, "test")
    limited = load_splits(dataclasses.replace(data, train_size=10))
    assert limited.train == splits.train[:10] and limited.val == splits.val


def test_relative_local_source_resolves_against_the_working_directory(local_source, monkeypatch):
    monkeypatch.chdir(local_source.parent)
    splits = load_splits(DataSpec(source=f"./{local_source.name}", val_size=0))
    assert len(splits.train) == 40 and splits.val == []


def test_a_local_source_needs_test_jsonl_only_when_the_test_split_is_read(local_source):
    (local_source / "test.jsonl").unlink()
    data = DataSpec(source=str(local_source), val_size=1)
    splits = load_splits(data)
    assert len(splits.train) == 39 and len(splits.val) == 1
    for read_test in (lambda: splits.test, lambda: load_test(data)):
        with pytest.raises(UserError, match="^data.source: ") as err:
            read_test()
        assert str(local_source / "test.jsonl") in str(err.value) and "\n" not in str(err.value)


def test_missing_train_jsonl_or_directory_is_a_user_error_naming_data_source_and_the_path(local_source):
    (local_source / "train.jsonl").unlink()
    with pytest.raises(UserError, match="^data.source: ") as err:
        load_splits(DataSpec(source=str(local_source), val_size=1))
    assert str(local_source / "train.jsonl") in str(err.value)
    with pytest.raises(UserError, match=r"data.source: directory not found: .*no-such-dir"):
        load_splits(DataSpec(source="./no-such-dir/gsm8k"))


@pytest.mark.parametrize("bad_line", [b"not json", b'["a list"]', b'{"question": 1, "answer": "x"}',
                                      b'{"question": "no answer"}', b'{"question": "caf\xe9", "answer": "x"}'])
def test_every_line_is_parsed_and_a_bad_one_is_a_user_error_naming_path_and_line(local_source, bad_line):
    rows = (local_source / "train.jsonl").read_bytes().splitlines()
    rows[30] = bad_line  # late in the file: every line is read, not a sample
    (local_source / "train.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(UserError) as err:
        load_splits(DataSpec(source=str(local_source), val_size=1))
    assert str(err.value).startswith(f"data.source: {local_source / 'train.jsonl'}:31: ")


def test_val_size_that_leaves_no_training_rows_is_a_spec_error(local_source):
    with pytest.raises(SpecError, match="data.val_size"):
        load_splits(DataSpec(source=str(local_source), val_size=40))


def test_embedded_gsm8k_mini_is_the_first_400_train_and_100_test_rows_of_gsm8k_unmodified(gsm8k_dir):
    folder = EMBEDDED["embedded:gsm8k-mini"]
    for name, count in (("train.jsonl", 400), ("test.jsonl", 100)):
        shipped = (folder / name).read_bytes().splitlines(keepends=True)
        assert shipped == (gsm8k_dir / name).read_bytes().splitlines(keepends=True)[:count]

    data = DataSpec(source="embedded:gsm8k-mini", val_size=50, split_seed=3)
    first_400 = load_splits(DataSpec(source=str(gsm8k_dir), val_size=0, train_size=400)).train
    splits = load_splits(data)
    assert (len(splits.train), len(splits.val)) == (350, 50)
    assert (splits.train, splits.val) == split_train(first_400, data)  # validation carved as for any source
    assert load_test(data) == splits.test == load_test(DataSpec(source=str(gsm8k_dir)))[:100]


def test_embedded_gsm8k_mini_ships_the_mit_licence_and_an_attribution():
    folder = EMBEDDED["embedded:gsm8k-mini"]
    licence = (folder / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2021 OpenAI" in licence
    readme = (folder / "README.md").read_text()
    for needed in ("github.com/openai/grade-school-math", "Training Verifiers to Solve Math Word Problems",
                   "Cobbe", "first 400", "first 100", "LICENSE"):
        assert needed in readme
    assert sorted(p.name for p in folder.iterdir()) == ["LICENSE", "README.md", "test.jsonl", "train.jsonl"]


def test_unknown_embedded_data_set_is_a_spec_error_naming_data_source():
    for name in EMBEDDED:  # the spec accepts every shipped name
        DataSpec(source=name).validate("data")
    with pytest.raises(SpecError, match="embedded:gsm8k-mini") as err:
        DataSpec(source="embedded:gsm8k-full").validate("data")
    assert err.value.path == "data.source"
    with pytest.raises(SpecError, match="^data.source: unknown embedded data set 'embedded:gsm8k-full'"):
        load_splits(DataSpec(source="embedded:gsm8k-full"))


def test_hub_source_without_datasets_is_a_user_error_naming_the_source(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match="data.source: 'openai/gsm8k'"):
        load_splits(DataSpec(source="openai/gsm8k"))


def test_unreachable_hub_source_exits_2_with_one_line_naming_the_source(tmp_path, repo_root):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {name: 'random:tiny'}\ndata: {source: no-such-org/no-such-set}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fail fast, no retries
    result = subprocess.run([sys.executable, "-m", "tune_llama.data", "stats", str(spec)],
                            cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: data.source: cannot load hub data set 'no-such-org/no-such-set'")


def test_final_answer_is_the_stripped_text_after_the_marker():
    assert final_answer("48/2 = <<48/2=24>>24\n####  72 \n") == "72"
    assert final_answer("no marker") == "no marker"


def test_data_package_imports_without_optional_packages(repo_root):
    code = ("import sys\n"
            "for name in ('datasets', 'ray', 'optuna', 'wandb'): sys.modules[name] = None\n"
            "import tune_llama.data, tune_llama.data.__main__\n"
            "from tune_llama.spec import DataSpec\n"
            "tune_llama.data.load_splits(DataSpec(synthetic_size=20, val_size=2))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- encoding

@pytest.mark.parametrize("adds_bos", [False, True])
def test_labels_are_ignored_exactly_on_prompt_positions_and_eos_is_the_last_label(problems, adds_bos):
    tokenizer = build_char_tokenizer()
    if adds_bos:
        from tokenizers import processors
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    data = DataSpec(max_length=1024)
    encoded = encode(problems, tokenizer, data)
    assert len(encoded) == len(problems) and encoded.truncated == 0
    for p, ids, labels in zip(problems, encoded.input_ids, encoded.labels):
        prompt = tokenizer(format_prompt(data.prompt_template, p["question"]), add_special_tokens=False).input_ids
        prompt = [tokenizer.bos_token_id] * adds_bos + prompt
        ids, labels = ids.tolist(), labels.tolist()
        assert ids[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):]
        assert IGNORE_INDEX not in labels[len(prompt):]
        assert labels[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[len(prompt):-1]) == p["answer"]


def prompt_lengths(problems, data: DataSpec) -> list[int]:
    """Prompt tokens of each problem under the character tokenizer (one token a character, no BOS)."""
    return [len(format_prompt(data.prompt_template, p["question"])) for p in problems]


def test_truncate_cuts_long_answers_and_drops_prompts_that_leave_no_room_for_an_answer(char_tokenizer, problems):
    data = DataSpec(max_length=150)  # between the shortest and the longest prompt of the fixture
    full = encode(problems, char_tokenizer, DataSpec(max_length=4096))
    no_room = [n >= data.max_length for n in prompt_lengths(problems, data)]
    assert 0 < sum(no_room) < len(problems)
    encoded = encode(problems, char_tokenizer, data)
    assert encoded.dropped == sum(no_room)
    assert encoded.truncated == len(encoded) == len(problems) - sum(no_room)  # every kept answer is cut
    kept = [ids for ids, dropped in zip(full.input_ids, no_room) if not dropped]
    assert all(torch.equal(cut, ids[:data.max_length]) for cut, ids in zip(encoded.input_ids, kept))


def test_drop_leaves_out_exactly_the_examples_longer_than_max_length(char_tokenizer, problems):
    data = DataSpec(max_length=260, overlong="drop")
    full = encode(problems, char_tokenizer, DataSpec(max_length=4096))
    fits = [n <= data.max_length for n in full.lengths]
    assert 0 < sum(fits) < len(problems)
    encoded = encode(problems, char_tokenizer, data)
    assert (encoded.dropped, encoded.truncated, len(encoded)) == (len(problems) - sum(fits), 0, sum(fits))
    kept = [i for i, ok in enumerate(fits) if ok]
    assert all(torch.equal(encoded.input_ids[j], full.input_ids[i]) for j, i in enumerate(kept))
    assert all(torch.equal(encoded.labels[j], full.labels[i]) for j, i in enumerate(kept))


def test_error_policy_is_a_spec_error_naming_the_example_and_data_max_length(char_tokenizer, problems):
    data = DataSpec(max_length=260, overlong="error")
    lengths = encode(problems, char_tokenizer, DataSpec(max_length=4096)).lengths
    first = next(i for i, n in enumerate(lengths) if n > data.max_length)
    with pytest.raises(SpecError) as err:
        encode(problems, char_tokenizer, data)
    message = str(err.value)
    assert err.value.path == "data.max_length" and "\n" not in message
    assert f"example {first + 1} of {len(problems)}" in message and f"is {lengths[first]} tokens" in message
    assert problems[first]["question"][:30] in message
    assert len(encode(problems, char_tokenizer, dataclasses.replace(data, max_length=max(lengths)))) == len(problems)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_a_split_left_empty_by_dropping_is_a_one_line_spec_error(char_tokenizer, problems, overlong):
    shortest_prompt = min(prompt_lengths(problems, DataSpec()))
    data = DataSpec(max_length=shortest_prompt, overlong=overlong)  # no prompt leaves room for an answer
    with pytest.raises(SpecError, match="data.overlong") as err:
        encode(problems, char_tokenizer, data)
    assert err.value.path == "data.max_length" and "\n" not in str(err.value)
    assert f"all {len(problems)} examples" in str(err.value)
    assert len(encode([], char_tokenizer, data)) == 0  # a split that was empty to begin with is no error


def test_truncated_and_dropped_examples_are_counted_in_one_warning(char_tokenizer, problems, caplog):
    data = DataSpec(max_length=150)
    with caplog.at_level(logging.WARNING, logger="tune_llama.data"):
        encoded = encode(problems, char_tokenizer, data)
    assert encoded.truncated > 0 and encoded.dropped > 0
    (record,) = [r for r in caplog.records if "max_length" in r.getMessage()]
    assert record.getMessage() == (f"{len(problems)} of {len(problems)} examples are longer than data.max_length=150: "
                                   f"{encoded.truncated} truncated, {encoded.dropped} dropped (data.overlong=truncate)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tune_llama.data"):
        encode(problems, char_tokenizer, DataSpec(max_length=4096))
    assert caplog.records == []


def test_unknown_characters_over_one_percent_give_one_warning_with_their_share(char_tokenizer, caplog):
    def problems(unknown: int) -> list[dict[str, str]]:
        # 10 + 100 + 9 prompt characters, 1 answer character, EOS: 121 tokens each
        return [{"question": "\u00e9" * unknown + "a" * (100 - unknown), "answer": "7"}] * 4

    with caplog.at_level(logging.WARNING, logger="tune_llama.data"):
        encode(problems(3), char_tokenizer, DataSpec())
    (record,) = caplog.records
    assert f"{100 * 3 / 121:.1f}% of the encoded tokens are the unknown token <unk>" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tune_llama.data"):
        encode(problems(1), char_tokenizer, DataSpec())  # 0.8%: below the threshold
    assert caplog.records == []


# ---------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def encoded(char_tokenizer, problems):
    return encode(problems, char_tokenizer, DataSpec(max_length=1024))


@pytest.mark.parametrize("mode", ["length_grouped", "random"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_make_batches_covers_every_example_exactly_once(encoded, mode, shuffle):
    data = DataSpec(batching=mode, batch_size=8, mega_batch_mult=3)
    batches = make_batches(encoded, data, pad_id=0, seed=1, epoch=0, shuffle=shuffle)
    assert Counter(rows_of(batches)) == Counter(tuple(ids.tolist()) for ids in encoded.input_ids)
    assert all(len(b["input_ids"]) <= 8 for b in batches) and len(batches) == 15


def test_padding_is_masked_out_of_attention_and_labels(encoded):
    for b in make_batches(encoded, DataSpec(batching="random", batch_size=8), pad_id=0, seed=0, epoch=0):
        pad = b["attention_mask"] == 0
        assert pad.any()
        assert (b["labels"][pad] == IGNORE_INDEX).all() and (b["input_ids"][pad] == 0).all()
        assert b["input_ids"].dtype == b["labels"].dtype == torch.long


@pytest.mark.parametrize("mode", ["length_grouped", "random", "packed"])
def test_make_batches_is_deterministic_for_seed_and_epoch_and_differs_across_epochs(encoded, mode):
    data = DataSpec(batching=mode, batch_size=8, mega_batch_mult=3, max_length=1024)
    order = lambda seed, epoch: rows_of(make_batches(encoded, data, 0, seed=seed, epoch=epoch))  # noqa: E731
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(0, 1) != order(1, 0)


def test_random_batching_sees_the_same_example_sequence_whatever_the_batch_size(encoded):
    data = DataSpec(batching="random")
    by_four = make_batches(encoded, data, 0, seed=3, epoch=2, batch_size=4)
    by_one = make_batches(encoded, data, 0, seed=3, epoch=2, batch_size=1)
    assert len(by_one) == 4 * len(by_four)
    assert rows_of(by_four) == rows_of(by_one)


BATCHING_CASES = [("length_grouped", None), ("length_grouped", 1024), ("length_grouped", 3000),
                  ("random", None), ("packed", None)]


@pytest.mark.parametrize("mode, budget", BATCHING_CASES)
@pytest.mark.parametrize("batch_size", [1, 3, 8, 50, 500])
def test_count_batches_equals_the_number_of_batches_made(encoded, mode, budget, batch_size):
    for max_length in (300, 1024):  # packed rows depend on max_length
        data = DataSpec(batching=mode, max_tokens_per_batch=budget, batch_size=4, mega_batch_mult=3,
                        max_length=max_length)
        for seed, epoch, shuffle in [(0, 0, True), (1, 2, True), (5, 0, False)]:
            made = make_batches(encoded, data, 0, seed=seed, epoch=epoch, shuffle=shuffle, batch_size=batch_size)
            assert count_batches(encoded, data, seed=seed, epoch=epoch, shuffle=shuffle,
                                 batch_size=batch_size) == len(made)
        assert count_batches(Encoded(), data, batch_size=batch_size) == 0 == len(
            make_batches(Encoded(), data, 0, seed=0, epoch=0, batch_size=batch_size))


def test_count_batches_defaults_to_data_batch_size(encoded):
    data = DataSpec(batch_size=7)
    assert count_batches(encoded, data) == len(make_batches(encoded, data, 0, seed=0, epoch=0)) == 18


@pytest.mark.parametrize("shuffle", [True, False])
def test_token_budget_batches_stay_within_budget_and_cover_every_example_once(encoded, shuffle):
    budget = 2000
    data = DataSpec(max_tokens_per_batch=budget, batch_size=4, mega_batch_mult=10, max_length=1024)
    batches = make_batches(encoded, data, 0, seed=1, epoch=0, shuffle=shuffle)
    assert Counter(rows_of(batches)) == Counter(tuple(ids.tolist()) for ids in encoded.input_ids)
    assert all(b["input_ids"].numel() <= budget for b in batches)
    assert max(len(b["input_ids"]) for b in batches) > data.batch_size  # rows follow the budget, not batch_size
    if not shuffle:  # one global sort: every batch but the last is full (one more row would break the budget)
        widths = [b["input_ids"].shape[1] for b in batches]
        assert all((len(b["input_ids"]) + 1) * w > budget for b, w in zip(batches[:-1], widths))


def test_token_budget_batching_is_deterministic_for_seed_and_epoch(encoded):
    data = DataSpec(max_tokens_per_batch=1500, mega_batch_mult=5, max_length=1024)
    order = lambda seed, epoch: rows_of(make_batches(encoded, data, 0, seed=seed, epoch=epoch))  # noqa: E731
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(0, 1) != order(1, 0)


def test_token_budget_below_max_length_is_a_spec_error_naming_the_field():
    DataSpec(max_length=512, max_tokens_per_batch=512).validate("data")
    with pytest.raises(SpecError, match="max_length") as err:
        DataSpec(max_length=512, max_tokens_per_batch=511).validate("data")
    assert err.value.path == "data.max_tokens_per_batch"


def test_unshuffled_length_grouped_batches_run_longest_first(encoded):
    batches = make_batches(encoded, DataSpec(batch_size=8), 0, seed=0, epoch=0, shuffle=False)
    lengths = [len(r) for r in rows_of(batches)]
    assert lengths == sorted(encoded.lengths, reverse=True)


def test_packed_rows_are_full_and_keep_prompt_labels_masked(encoded):
    data = DataSpec(batching="packed", batch_size=4, max_length=300)
    batches = make_batches(encoded, data, 0, seed=0, epoch=0, shuffle=False)
    rows = rows_of(batches)
    assert all(len(r) == 300 for r in rows[:-1]) and 0 < len(rows[-1]) <= 300
    assert [t for r in rows for t in r] == torch.cat(encoded.input_ids).tolist()
    masked = sum(int((b["labels"][b["attention_mask"].bool()] == IGNORE_INDEX).sum()) for b in batches)
    assert masked == sum(int((lab == IGNORE_INDEX).sum()) for lab in encoded.labels)


def test_length_grouped_batches_of_16_are_97_percent_real_tokens_on_gsm8k(gsm8k_dir, smollm2_tokenizer):
    data = DataSpec(source=str(gsm8k_dir), batch_size=16)
    train = encode(load_splits(data).train, smollm2_tokenizer, data)
    share = {mode: real_token_share(make_batches(train, dataclasses.replace(data, batching=mode),
                                                 smollm2_tokenizer.pad_token_id, seed=0, epoch=0))
             for mode in ("length_grouped", "random")}
    assert share["length_grouped"] >= 0.97
    assert share["random"] < 0.65  # about 0.56: random batches are mostly padding-bound


def test_shipped_demo_spec_runs_on_full_gsm8k_dropping_the_few_examples_over_its_max_length(
        gsm8k_dir, repo_root, capsys, smollm2_tokenizer):
    demo = repo_root / "search_spaces" / "demo.yaml"
    max_length = load_spec(demo).data.max_length
    with pytest.raises(SystemExit) as exit_:
        run_command("data", ["stats", str(demo), "--json", "--set", f"data.source={gsm8k_dir}", "--set", "data.train_size=null"])
    assert exit_.value.code == 0
    train = json.loads(capsys.readouterr().out)["splits"]["train"]
    assert train["problems"] > 7000, "all of GSM8K's train split"
    assert 0 < train["dropped"] < 0.1 * train["problems"] and train["truncated"] == 0  # data.overlong: drop
    assert train["examples"] + train["dropped"] == train["problems"]
    assert train["tokens"]["max"] <= max_length


# ---------------------------------------------------------------- stats CLI

@pytest.fixture
def tiny_spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  name: random:tiny\n"
                    "data:\n  source: synthetic\n  synthetic_size: 60\n  val_size: 10\n  batch_size: 4\n")
    return path


def test_stats_cli_json_output_parses(tiny_spec, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_command("data", ["stats", str(tiny_spec), "--json", "--set", "data.batching=packed"])
    assert exit_.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert {k: v["problems"] for k, v in report["splits"].items()} == {"train": 50, "val": 10, "test": 200}
    assert all(report["splits"][k]["examples"] == report["splits"][k]["problems"] for k in ("train", "val"))
    assert all(report["splits"][k]["truncated"] == report["splits"][k]["dropped"] == 0 for k in ("train", "val"))
    assert report["splits"]["train"]["tokens"]["min"] <= report["splits"]["train"]["tokens"]["max"]
    assert set(report["real_token_share"]) == {"packed", "random"}
    assert all(0 < s <= 1 for s in report["real_token_share"].values())


def test_stats_cli_counts_truncated_and_dropped_examples_in_text_and_json(tiny_spec, capsys):
    overrides = ["--set", "data.max_length=150"]  # between the shortest and the longest synthetic prompt
    with pytest.raises(SystemExit) as exit_:
        run_command("data", ["stats", str(tiny_spec), "--json", *overrides])
    assert exit_.value.code == 0
    train = json.loads(capsys.readouterr().out)["splits"]["train"]
    assert train["dropped"] > 0 and train["truncated"] > 0
    assert train["examples"] + train["dropped"] == train["problems"] == 50
    with pytest.raises(SystemExit):
        run_command("data", ["stats", str(tiny_spec), *overrides])
    assert f"truncated {train['truncated']}  dropped {train['dropped']}" in capsys.readouterr().out


def test_stats_cli_runs_on_a_local_source_without_test_jsonl(local_source, tmp_path, capsys):
    (local_source / "test.jsonl").unlink()
    spec = tmp_path / "local.yaml"
    spec.write_text(f"model: {{name: 'random:tiny'}}\ndata: {{source: '{local_source}', val_size: 5}}\n")
    with pytest.raises(SystemExit) as exit_:
        run_command("data", ["stats", str(spec)])
    assert exit_.value.code == 0
    assert "test: no test split" in capsys.readouterr().out


@pytest.mark.parametrize("setting, field", [("data.batch_size=0", "data.batch_size"),
                                            ("data.max_tokens_per_batch=100", "data.max_tokens_per_batch"),
                                            ("data.overlong=skip", "data.overlong")])
def test_stats_cli_bad_set_exits_2_with_one_line_naming_the_field(tiny_spec, capsys, setting, field):
    with pytest.raises(SystemExit) as exit_:
        run_command("data", ["stats", str(tiny_spec), "--set", setting])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err
