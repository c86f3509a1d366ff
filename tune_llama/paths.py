"""Files and folders: where tune-llama keeps what it makes once and reuses (one place reads
``$TUNE_LLAMA_CACHE``), what a name that looks like a path means, reading a JSON file that may be missing or
half written, and the modes a written file should have."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


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


def relative_note(name: str, spec_file: Optional[str] = None) -> str:
    """For a relative path that was not found: `` (resolved against the current directory /x, not the spec's
    folder /x/specs)``, and where it does exist beside the spec, that path; '' for an absolute one."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return ""
    note = f" (resolved against the current directory {Path.cwd()}"
    spec_dir = Path(spec_file).expanduser().resolve().parent if spec_file else None
    if spec_dir is not None and spec_dir != Path.cwd():
        note += f", not the spec's folder {spec_dir}"
        if (spec_dir / path).is_dir():
            note += f"; it is there: give {(spec_dir / path).resolve()}"
    return note + ")"


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it over: a kill leaves the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The file's JSON value; None when it is missing, unreadable or not (yet) whole JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``os.umask`` must set one to read
    it, which a thread writing files at that moment would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: Path) -> Path:
    """Give ``path`` and everything under it the modes a plain ``mkdir``/``open`` would have (0755 folders,
    0644 files under umask 0022). Atomic writes go through private temporaries (``tempfile.mkdtemp`` is 0700,
    ``mkstemp`` and transformers' shard writer 0600), and a rename keeps those modes: a labmate could not
    read the model."""
    mask = current_umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
    return path
