"""`tune-llama wheelhouse`: repacked wheels keep a valid RECORD that pip accepts, the target's platform
takes older manylinux wheels, and bad options are one-line errors."""

from __future__ import annotations

import base64
import csv
import hashlib
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import one_line_error
from tune_llama.__main__ import main
from tune_llama.errors import UserError
from tune_llama.wheelhouse import needed_without, platform_tags, split, trim_bitsandbytes, trim_ray


PIP_QUIET = ["--disable-pip-version-check", "-q"]


def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(path: Path, dist: str, version: str, files: dict[str, bytes], executable: set[str] = frozenset()) -> Path:
    """A wheel with a correct RECORD, written here byte by byte (not with the code under test)."""
    info = f"{dist}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    record = "".join(f"{name},{digest(data)},{len(data)}\n" for name, data in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            member = zipfile.ZipInfo(name, (2026, 1, 1, 0, 0, 0))
            member.external_attr = (0o755 if name in executable else 0o644) << 16
            archive.writestr(member, data)
        archive.writestr(f"{info}/RECORD", record)
    return path


def record_problems(wheel: Path) -> list[str]:
    """Every way the wheel's RECORD disagrees with its members (empty when it is valid)."""
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        record_name = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(archive.read(record_name).decode().splitlines()))
        listed = {row[0]: row for row in rows}
        if len(listed) != len(rows):
            problems.append("a file is listed twice")
        members = [n for n in archive.namelist() if not n.endswith("/")]
        for name in members:
            if name not in listed:
                problems.append(f"{name} not in RECORD")
            elif name == record_name:
                if listed[name][1:] != ["", ""]:
                    problems.append(f"RECORD's own line has a hash or size: {listed[name]}")
            else:
                data = archive.read(name)
                if listed[name][1:] != [digest(data), str(len(data))]:
                    problems.append(f"{name}: RECORD says {listed[name][1:]}")
        problems += [f"{name} in RECORD but not in the wheel" for name in listed if name not in members]
    return problems


def pip_install_target(wheel: Path, target: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "install", *PIP_QUIET, "--no-index", "--no-deps",
                           "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


RAY_FILES = {"ray/__init__.py": b"VERSION = '2.60.0'\n", "ray/tune/__init__.py": b"# tune\n",
             "ray/_raylet.so": bytes(range(256)) * 64, "ray/jars/ray_dist.jar": b"PK java" * 1000,
             "ray/rllib/__init__.py": b"# rllib\n", "ray/serve/__init__.py": b"# serve\n",
             "ray/llm/__init__.py": b"# llm\n", "ray/serve_like.py": b"# not under ray/serve/\n"}


def test_trimmed_ray_has_no_jars_rllib_serve_or_llm_a_valid_record_and_pip_installs_it(tmp_path):
    wheel = write_wheel(tmp_path / "ray-2.60.0-py3-none-any.whl", "ray", "2.60.0", RAY_FILES, {"ray/_raylet.so"})
    assert record_problems(wheel) == []  # the checker accepts a correct wheel
    dropped = trim_ray(wheel)
    assert sorted(dropped) == ["ray/jars/ray_dist.jar", "ray/llm/__init__.py", "ray/rllib/__init__.py",
                               "ray/serve/__init__.py"]
    assert record_problems(wheel) == []
    with zipfile.ZipFile(wheel) as archive:
        record = archive.read("ray-2.60.0.dist-info/RECORD").decode()
        assert "ray/jars" not in record and "ray/serve_like.py" in record
        assert (archive.getinfo("ray/_raylet.so").external_attr >> 16) & stat.S_IXUSR  # executable bit kept
    site = tmp_path / "site"
    pip_install_target(wheel, site)
    assert (site / "ray" / "tune" / "__init__.py").is_file() and (site / "ray" / "serve_like.py").is_file()
    assert not any((site / "ray" / gone).exists() for gone in ("jars", "rllib", "serve", "llm"))
    assert (site / "ray" / "_raylet.so").read_bytes() == RAY_FILES["ray/_raylet.so"]


def test_a_wrong_record_is_caught_by_the_checker(tmp_path):
    wheel = write_wheel(tmp_path / "ray-2.60.0-py3-none-any.whl", "ray", "2.60.0", RAY_FILES)
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("ray/extra.py", b"# not in RECORD\n")
    assert record_problems(wheel) == ["ray/extra.py not in RECORD"]


BNB = {f"bitsandbytes/libbitsandbytes_{build}.so": build.encode() * 100
       for build in ("cpu", "cuda126", "cuda130", "cuda132", "rocm72", "xpu2026")}


def test_trimmed_bitsandbytes_keeps_the_cpu_library_and_the_named_cuda_one(tmp_path):
    wheel = write_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl", "bitsandbytes", "0.50.2",
                        {"bitsandbytes/__init__.py": b"# bnb\n", **BNB})
    trim_bitsandbytes(wheel, "13.0")
    assert record_problems(wheel) == []
    with zipfile.ZipFile(wheel) as archive:
        libraries = sorted(n.rsplit("/", 1)[1] for n in archive.namelist() if n.endswith(".so"))
    assert libraries == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    pip_install_target(wheel, tmp_path / "site")
    assert (tmp_path / "site" / "bitsandbytes" / "libbitsandbytes_cuda130.so").read_bytes() == BNB[
        "bitsandbytes/libbitsandbytes_cuda130.so"]


def test_a_cuda_version_bitsandbytes_lacks_is_an_error_naming_the_ones_it_has(tmp_path):
    wheel = write_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl", "bitsandbytes", "0.50.2", BNB)
    with pytest.raises(UserError, match=r"--cuda 12\.9: .* has no library for it; it has 12\.6, 13\.0, 13\.2"):
        trim_bitsandbytes(wheel, "12.9")
    assert record_problems(wheel) == []  # left as it was


def test_a_manylinux_platform_takes_the_older_manylinux_wheels_too_never_newer():
    tags = platform_tags("manylinux_2_28_x86_64")
    assert {"manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and not any("aarch64" in t for t in tags)
    assert platform_tags("macosx_14_0_arm64") == ["macosx_14_0_arm64"]


def test_an_excluded_package_takes_its_own_dependencies_along_but_not_shared_ones():
    resolved = [{"name": "tune-llama", "requires": ["wandb", "ray", "torch"]},
                {"name": "wandb", "requires": ["sentry-sdk", "protobuf"]}, {"name": "sentry-sdk", "requires": []},
                {"name": "ray", "requires": ["protobuf"]}, {"name": "protobuf", "requires": []},
                {"name": "torch", "requires": []}]
    assert needed_without(resolved, {"wandb"}) == {"tune-llama", "ray", "protobuf", "torch"}
    assert needed_without(resolved, set()) == {n["name"] for n in resolved}


def test_split_sorts_the_wheels_into_folders_under_the_limit_largest_first(tmp_path):
    sizes = {"ray.whl": 42, "matplotlib.whl": 9, "pillow.whl": 7, "fonttools.whl": 5, "a.whl": 1, "b.whl": 1}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    split(tmp_path, 50)
    folders = {p.name: sorted(w.name for w in p.glob("*.whl")) for p in tmp_path.iterdir()}
    # 42 + 9 > 50: matplotlib opens folder 2; pillow still fits beside ray, and a.whl fills it to 50.
    assert folders == {"1": ["a.whl", "pillow.whl", "ray.whl"], "2": ["b.whl", "fonttools.whl", "matplotlib.whl"]}


@pytest.mark.parametrize("argv, named", [
    (["--python", "twelve"], "--python twelve"),
    (["--platform", "many linux"], "--platform many linux"),
    (["--cuda", "13"], "--cuda 13"),
    (["--cuda", "13.0"], "--cuda 13.0: only --trim"),
    (["--exclude", "tune_llama"], "--exclude tune-llama"),
    (["--split", "0"], "--split 0"),
])
def test_bad_options_are_one_line_errors_naming_them(argv, named, tmp_path, capsys):
    err = one_line_error(main, ["wheelhouse", str(tmp_path / "wh"), *argv], capsys)
    assert named in err


def test_a_bad_present_line_or_a_missing_present_file_or_a_full_folder_is_named(tmp_path, capsys):
    present = tmp_path / "present.txt"
    present.write_text("torch==2.11.0+cu130\n-e git+https://example.org/x#egg=x\nnot a package line\n")
    err = one_line_error(main, ["wheelhouse", str(tmp_path / "wh"), "--present", str(present)], capsys)
    assert f"--present {present}:3" in err and "not a package line" in err
    err = one_line_error(main, ["wheelhouse", str(tmp_path / "wh"), "--present", str(tmp_path / "none.txt")], capsys)
    assert "none.txt" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "exists and is not an empty folder" in one_line_error(main, ["wheelhouse", str(tmp_path / "full")], capsys)
