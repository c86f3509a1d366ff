"""The on-disk cache of encoded examples: same tensors as a fresh encode, keyed on everything they depend on."""

from __future__ import annotations

import dataclasses

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
    assert len(a) == len(b) and a.truncated == b.truncated
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


def test_a_damaged_cache_file_is_encoded_again(cache_dir, char_tokenizer):
    data = DataSpec(synthetic_size=20, val_size=5)
    problems = load_splits(data).train
    encode_cached(problems, char_tokenizer, data)
    (cached,) = cache_root().glob("*.pt")
    cached.write_bytes(b"not a tensor file")
    assert_same(encode_cached(problems, char_tokenizer, data), encode(problems, char_tokenizer, data))


def test_sets_below_the_threshold_are_encoded_directly(tmp_path, monkeypatch, char_tokenizer):
    monkeypatch.setenv("TUNE_LLAMA_CACHE", str(tmp_path))
    data = DataSpec(synthetic_size=20, val_size=5)
    problems = load_splits(data).train
    assert len(problems) < cache.MIN_PROBLEMS
    assert_same(encode_cached(problems, char_tokenizer, data), encode(problems, char_tokenizer, data))
    assert not cache_root().exists()
