"""Where tune-llama keeps what it makes once and reuses: one place reads ``$TUNE_LLAMA_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def cache_dir() -> Path:
    """``$TUNE_LLAMA_CACHE``, else ``~/.cache/tune_llama``: the converted embedded model and encoded data."""
    return Path(os.environ.get("TUNE_LLAMA_CACHE", Path.home() / ".cache" / "tune_llama")).expanduser()


def looks_like_path(name: str) -> bool:
    """Whether a model or data name is meant as a folder rather than a hub id (``org/name``): it starts with
    ``.``, ``~`` or ``/``, holds more than one ``/``, or its parent folder exists."""
    if ":" in name.split("/")[0]:  # embedded:..., random:..., a URL
        return False
    if name.startswith((".", "~", "/")) or name.count("/") > 1:
        return True
    parent = Path(name).expanduser().parent
    return str(parent) != "." and parent.is_dir()


def missing_folder(name: str) -> Optional[Path]:
    """The folder ``name`` names when it looks like a path and is no folder (a typo, not a hub id), else None:
    so the error says ``directory not found`` at once instead of the hub's complaint about a repo id."""
    path = Path(name).expanduser()
    return path if looks_like_path(name) and not path.is_dir() else None
