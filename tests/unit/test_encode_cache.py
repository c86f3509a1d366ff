"""The on-disk cache of encoded examples: same tensors as a fresh encode, keyed on everything they depend on."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from tune_llama.data import cache, load_splits
from tune_llama.data.cache import cache_root, encode_cached
from tune_llama.data.examples import encode
from tune_llama.spec import DataSpec


class CountingTokenizer:
    """Wraps a tokenizer and counts the batch encodes (the expensive calls) that reach it."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        self.calls += isinstance(text, list)
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache folder, and caching from the first problem (the tests use small sets)."""
    monkeypatch.setenv("TUNE_LLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "MIN_PROBLEMS", 1)
    return tmp_path


def assert_same(a, b) -> None:
    assert len(a) == len(b) and a.truncated == b.truncated and a.dropped == b.dropped
    assert all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    assert all(torch.equal(x, y) for x, y in zip(a.labels, b.labels))


def test_a_second_encode_of_the_same_problems_reads_the_cache_and_matches_a_fresh_encode(cache_dir, char_tokenizer):
    data = DataSpec(synthetic_size=30, val_size=5, max_length=200)  # short: some rows are truncated
    problems = load_splits(data).train
    fresh = encode(problems, char_tokenizer, data)
    assert fresh.truncated > 0

    first = CountingTokenizer(char_tokenizer)
    assert_same(encode_cached(problems, first, data), fresh)
    assert first.calls > 0 and len(list(cache_root().glob("*.pt"))) == 1

    second = CountingTokenizer(char_tokenizer)
    assert_same(encode_cached(problems, second, data), fresh)
    assert second.calls == 0


def test_other_problems_or_max_length_miss_the_cache(cache_dir, char_tokenizer):
    data = DataSpec(synthetic_size=30, val_size=5, max_length=512)
    problems = load_splits(data).train
    encode_cached(problems, char_tokenizer, data)
    shorter = dataclasses.replace(data, max_length=200)
    assert_same(encode_cached(problems, char_tokenizer, shorter), encode(problems, char_tokenizer, shorter))
    assert_same(encode_cached(problems[1:], char_tokenizer, data), encode(problems[1:], char_tokenizer, data))
    assert len(list(cache_root().glob("*.pt"))) == 3


def test_a_damaged_cache_file_is_encoded_again_and_replaced_by_one_that_is_read(cache_dir, char_tokenizer):
    data = DataSpec(synthetic_size=20, val_size=5)
    problems = load_splits(data).train
    encode_cached(problems, char_tokenizer, data)
    (cached,) = cache_root().glob("*.pt")
    cached.write_bytes(b"not a tensor file")

    again = CountingTokenizer(char_tokenizer)
    assert_same(encode_cached(problems, again, data), encode(problems, char_tokenizer, data))
    assert again.calls > 0 and cached.read_bytes() != b"not a tensor file"

    reader = CountingTokenizer(char_tokenizer)
    assert_same(encode_cached(problems, reader, data), encode(problems, char_tokenizer, data))
    assert reader.calls == 0  # the rewritten file is what the next call reads


def test_the_cached_file_is_what_a_hit_returns(cache_dir, char_tokenizer):
    data = DataSpec(synthetic_size=20, val_size=5)
    problems = load_splits(data).train
    encode_cached(problems, char_tokenizer, data)
    (cached,) = cache_root().glob("*.pt")
    saved = torch.load(cached, weights_only=True)
    saved["input_ids"] = saved["input_ids"] + 1  # a marker only a read of this file can return
    saved["truncated"], saved["dropped"] = 5, 6
    torch.save(saved, cached)
    hit = encode_cached(problems, char_tokenizer, data)
    fresh = encode(problems, char_tokenizer, data)
    assert (hit.truncated, hit.dropped) == (5, 6)
    assert all(torch.equal(x, y + 1) for x, y in zip(hit.input_ids, fresh.input_ids))


def test_overlong_policy_is_part_of_the_key_and_dropped_counts_come_back_from_the_cache(cache_dir, char_tokenizer):
    truncate = DataSpec(synthetic_size=30, val_size=5, max_length=200)
    drop = dataclasses.replace(truncate, overlong="drop")
    problems = load_splits(truncate).train
    encode_cached(problems, char_tokenizer, truncate)
    first = CountingTokenizer(char_tokenizer)
    assert_same(encode_cached(problems, first, drop), encode(problems, char_tokenizer, drop))
    assert first.calls > 0 and len(list(cache_root().glob("*.pt"))) == 2

    second = CountingTokenizer(char_tokenizer)
    hit = encode_cached(problems, second, drop)
    assert second.calls == 0 and hit.dropped > 0 and hit.truncated == 0
    assert_same(hit, encode(problems, char_tokenizer, drop))


def test_a_cache_hit_logs_the_same_warnings_as_a_fresh_encode(cache_dir, char_tokenizer, caplog):
    data = DataSpec(synthetic_size=30, val_size=5, max_length=150)  # some truncated, some dropped
    problems = [{**p, "question": "\u00e9" * 5 + p["question"]} for p in load_splits(data).train]  # <unk> > 1%

    def warnings(tokenizer) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tune_llama.data"):
            encode_cached(problems, tokenizer, data)
        return [r.getMessage() for r in caplog.records]

    fresh = warnings(char_tokenizer)
    assert len(fresh) == 2 and "dropped" in fresh[0] and "unknown token" in fresh[1]
    counting = CountingTokenizer(char_tokenizer)
    assert warnings(counting) == fresh and counting.calls == 0


def test_sets_below_the_threshold_are_encoded_directly(tmp_path, monkeypatch, char_tokenizer):
    monkeypatch.setenv("TUNE_LLAMA_CACHE", str(tmp_path))
    data = DataSpec(synthetic_size=20, val_size=5)
    problems = load_splits(data).train
    assert len(problems) < cache.MIN_PROBLEMS
    assert_same(encode_cached(problems, char_tokenizer, data), encode(problems, char_tokenizer, data))
    assert not cache_root().exists()
