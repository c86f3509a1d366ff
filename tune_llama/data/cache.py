"""Encoded examples cached on disk, so the trials of a search do not each re-tokenize the same problems.

Encoding GSM8K's 7,273 training problems with the SmolLM2 tokenizer takes ~10-25 s
on a 2-core machine, more than the rest of a trial's start-up together; loading
the cached tensors takes well under a second. The key covers everything the
result depends on: the problems' text, the tokenizer (its full serialised form
and special tokens), ``max_length``, the over-length policy (``overlong``), the
prompt template, and the source of ``examples.py`` itself, so a change to any of
them encodes afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import torch

from tune_llama.data import examples
from tune_llama.paths import cache_dir
from tune_llama.data.examples import Encoded, adds_bos, encode, warn_if_overlong, warn_if_unknown
from tune_llama.spec import DataSpec

_CODE = hashlib.sha256(Path(examples.__file__).read_bytes()).hexdigest()
MIN_PROBLEMS = 256
"""Smaller sets encode faster (well under 0.1 s) than the tokenizer can be fingerprinted: not cached."""
_TOKENIZER_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cache_root() -> Path:
    """``$TUNE_LLAMA_CACHE/encoded`` (default ``~/.cache/tune_llama/encoded``), next to the converted model."""
    return cache_dir() / "encoded"


def fingerprint(problems: list[dict[str, str]], tokenizer, data: DataSpec) -> Optional[str]:
    """The cache key, or None for a tokenizer without a serialisable fast backend (never cached)."""
    tokenizer_key = _tokenizer_key(tokenizer)
    if tokenizer_key is None:
        return None
    digest = hashlib.sha256(_CODE.encode())
    settings = [data.max_length, data.overlong, data.prompt_template, tokenizer.bos_token_id, tokenizer.eos_token_id,
                adds_bos(tokenizer), tokenizer_key]
    digest.update(json.dumps(settings).encode())
    digest.update(json.dumps(problems, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:40]


def _tokenizer_key(tokenizer) -> Optional[str]:
    """A digest of the tokenizer's full serialised form, computed once per tokenizer object (~0.1 s)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return _TOKENIZER_KEYS[tokenizer]
    except (KeyError, TypeError):
        pass
    key = hashlib.sha256(backend.to_str().encode()).hexdigest()
    try:
        _TOKENIZER_KEYS[tokenizer] = key
    except TypeError:  # not weakly referenceable: fingerprint it every time
        pass
    return key


def encode_cached(problems: list[dict[str, str]], tokenizer, data: DataSpec) -> Encoded:
    """``encode`` with an on-disk cache; the same result, tensor for tensor."""
    key = fingerprint(problems, tokenizer, data) if len(problems) >= MIN_PROBLEMS else None
    if key is None:
        return encode(problems, tokenizer, data)
    path = cache_root() / f"{key}.pt"
    cached = _load(path)
    if cached is None:  # missing, damaged or foreign: encode again and (over)write it
        out = encode(problems, tokenizer, data)
        _save(out, path)
        return out
    out, flat_ids = cached
    warn_if_overlong(out, data)  # the same warnings as a fresh encode
    warn_if_unknown(flat_ids, tokenizer)
    return out


def _load(path: Path) -> Optional[tuple[Encoded, torch.Tensor]]:
    """The cached examples and their concatenated ids, or None when the file cannot be used."""
    try:
        saved = torch.load(path, weights_only=True)
        lengths = saved["lengths"].tolist()
        out = Encoded(list(saved["input_ids"].split(lengths)), list(saved["labels"].split(lengths)),
                      int(saved["truncated"]), int(saved["dropped"]))
        return out, saved["input_ids"]
    except Exception:  # any unreadable file is only a cache miss
        return None


def _save(encoded: Encoded, path: Path) -> None:
    """Written to a temporary file and renamed: concurrent trials never read half a file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".encoding-", suffix=".pt")
        os.close(fd)
        torch.save({"input_ids": torch.cat(encoded.input_ids), "labels": torch.cat(encoded.labels),
                    "lengths": torch.tensor(encoded.lengths), "truncated": encoded.truncated,
                    "dropped": encoded.dropped}, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache folder only costs the next trial an encode
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
