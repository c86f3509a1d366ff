"""Where tune-llama keeps what it makes once and reuses: one place reads ``$TUNE_LLAMA_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TUNE_LLAMA_CACHE``, else ``~/.cache/tune_llama``: the converted embedded model and encoded data."""
    return Path(os.environ.get("TUNE_LLAMA_CACHE", Path.home() / ".cache" / "tune_llama")).expanduser()
