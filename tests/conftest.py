"""Fixtures shared by the test files: paths and tokenizers (session-scoped: they are slow to build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune_llama.model import load_tokenizer
from tune_llama.spec import ModelSpec

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The real GSM8K rows at ../shared/gsm8k (relative to the repo root); skips only when absent."""
    path = REPO_ROOT.parent / "shared" / "gsm8k"
    if not path.is_dir():
        pytest.skip(f"real GSM8K not found at {path} (expected next to the repository in ../shared/gsm8k)")
    return path


@pytest.fixture(scope="session")
def char_tokenizer():
    """The built-in character tokenizer of ``random:tiny`` models (no BOS added by default)."""
    return load_tokenizer(ModelSpec(name="random:tiny"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer (first use converts the model, ~60 s; then cached)."""
    return load_tokenizer(ModelSpec(name="embedded:smollm2"))
