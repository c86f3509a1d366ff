"""Files a labmate can read: what train writes follows the umask (0022: readable by the group and others),
never a fixed private mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import TINY
from tune_llama.spec import load_spec


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_trains_best_model_is_readable_by_the_group_and_others_under_umask_0022(tmp_path, umask_0022):
    from tune_llama.train import train
    spec = load_spec(TINY, ["training.epochs=1", "data.synthetic_size=32"])
    train(spec, tmp_path / "run")
    found = modes(tmp_path / "run" / "best")
    assert "model.safetensors" in found
    assert {name: mode for name, mode in found.items() if mode != (0o755 if name == "." else 0o644)} == {}


def test_sharing_follows_the_umask_not_a_fixed_mode(tmp_path):
    from tune_llama.paths import share_as_umask_allows
    import tempfile
    private = Path(tempfile.mkdtemp(dir=tmp_path))
    (private / "sub").mkdir(mode=0o700)
    fd, name = tempfile.mkstemp(dir=private / "sub")
    os.close(fd)
    old = os.umask(0o027)
    try:
        share_as_umask_allows(private)
    finally:
        os.umask(old)
    assert modes(private) == {".": 0o750, "sub": 0o750, f"sub/{Path(name).name}": 0o640}
