"""``tune-llama wheelhouse DIR``: the wheels a machine without a package index lacks, for an offline install.

Run it where pip reaches an index (a login node), copy DIR across, and install with the one command it
prints. pip resolves tune-llama's whole dependency tree for the target (``--python``, ``--platform``),
with the target's own packages (``--present``, its ``pip list --format=freeze``) pinned so the rest fits
them; only the wheels the target lacks are downloaded. ``--trim`` repacks the two wheels too big to carry
as they are: Ray without its Java jars, RLlib, Serve and LLM (none of which a Tune search imports), and
bitsandbytes with only the CUDA library of ``--cuda``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from tune_llama.errors import UserError

SOURCE_ROOT = Path(__file__).resolve().parent.parent
RAY_UNUSED = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
BNB_LIBRARY = re.compile(r"^bitsandbytes/libbitsandbytes_(cuda\d+|rocm\d+|xpu\d+)\.\w+$")
MANYLINUX = re.compile(r"^manylinux_2_(\d+)_(\w+)$")
# The legacy manylinux names and the glibc each stands for (PEP 600).
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------- the target

def platform_tags(platform: str) -> list[str]:
    """``platform`` and the older tags a machine of that platform also runs.

    pip takes ``--platform`` literally: ``manylinux_2_28_x86_64`` alone turns down Ray's
    ``manylinux2014_x86_64`` wheel, which a glibc-2.28 machine runs.
    """
    match = MANYLINUX.match(platform)
    if not match:
        return [platform]
    glibc, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    return tags + [f"{legacy}_{arch}" for minor, legacy in LEGACY_MANYLINUX.items() if minor <= glibc]


def target_args(python: Optional[str], platforms: list[str]) -> list[str]:
    args = ["--only-binary=:all:"]
    if python:
        args += ["--python-version", python]
    for platform in platforms:
        for tag in platform_tags(platform):
            if tag not in args:
                args += ["--platform", tag]
    return args


def read_present(path: Path) -> dict[str, Optional[str]]:
    """Canonical name -> version (None when unknown) of a ``pip list --format=freeze`` file."""
    present: dict[str, Optional[str]] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # comments, blank lines, pip options such as -e
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+)|@\s*\S.*)?", line)
        if not match:
            raise UserError(f"--present {path}:{number}: not a 'name==version' line: {line!r}")
        present[canonical(match.group(1))] = match.group(2)
    return present


def constraints(present: dict[str, Optional[str]]) -> str:
    """Pins for the resolver, so what it adds fits the target's own packages. A local version (``+cu130``)
    is dropped: the index has the same release without it, and only its metadata is read."""
    return "".join(f"{name}=={version.split('+')[0]}\n" for name, version in sorted(present.items()) if version)


def cuda_of(present: dict[str, Optional[str]]) -> Optional[str]:
    """The CUDA version of the target's torch (``2.11.0+cu130`` -> ``13.0``), if its version says."""
    match = re.search(r"\+cu(\d+)(\d)$", present.get("torch") or "")
    return f"{match.group(1)}.{match.group(2)}" if match else None


# ---------------------------------------------------------------- pip

def pip(args: list[str], what: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()
        raise UserError(f"{what}: pip failed: {errors[0] if errors else f'exit {proc.returncode}'}")
    return proc.stdout


def build_own_wheel(out: Path) -> Path:
    """tune-llama's own wheel, built from a copy of the source tree (the clone gets no build/ folder)."""
    if not (SOURCE_ROOT / "pyproject.toml").is_file():
        raise UserError(f"tune-llama's source (pyproject.toml) is not next to the package in {SOURCE_ROOT}: "
                        f"run wheelhouse from a clone")
    with tempfile.TemporaryDirectory(prefix="tune-llama-src-") as tmp:
        source = Path(tmp) / "src"
        shutil.copytree(SOURCE_ROOT / "tune_llama", source / "tune_llama",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(SOURCE_ROOT / name, source / name)
        # Without build isolation the build needs no index (setuptools is already here).
        isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        pip(["wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(source)], "building tune-llama's wheel")
    return next(out.glob("tune_llama-*.whl"))


def resolve(requirement: str, target: list[str], pins: str, python: Optional[str]) -> list[dict]:
    """pip's resolution of ``requirement`` for the target: one ``{name, version, requires}`` per package."""
    with tempfile.TemporaryDirectory(prefix="tune-llama-resolve-") as tmp:
        report, constraint = Path(tmp) / "report.json", Path(tmp) / "present.txt"
        constraint.write_text(pins)
        pip(["install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *target,
             "-c", str(constraint), requirement], "resolving tune-llama's dependencies for the target")
        items = json.loads(report.read_text())["install"]
    return [{"name": canonical(i["metadata"]["name"]), "version": i["metadata"]["version"],
             "requires": dependencies(i, python)} for i in items]


def dependencies(item: dict, python: Optional[str]) -> list[str]:
    """Names a resolved package needs on the target: its Requires-Dist whose markers hold there, for the
    extras it was asked with."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    environment = default_environment()
    if python:
        environment.update(python_version=python, python_full_version=f"{python}.0")
    names = []
    for text in item["metadata"].get("requires_dist") or []:
        requirement = Requirement(text)
        extras = [""] + list(item.get("requested_extras") or [])
        if requirement.marker is None or any(requirement.marker.evaluate({**environment, "extra": extra})
                                             for extra in extras):
            names.append(canonical(requirement.name))
    return names


def needed_without(resolved: list[dict], excluded: set[str]) -> set[str]:
    """The packages tune-llama still reaches when ``excluded`` are left out: an excluded package's own
    dependencies go too, unless something kept needs them."""
    requires = {n["name"]: n["requires"] for n in resolved}
    kept: set[str] = set()
    todo = ["tune-llama"]
    while todo:
        name = todo.pop()
        if name in kept or name in excluded or name not in requires:
            continue
        kept.add(name)
        todo += requires[name]
    return kept


# ---------------------------------------------------------------- repacking

def urlsafe_digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(wheel: Path, keep: Callable[[str], bool]) -> list[str]:
    """Rewrite ``wheel`` in place with only the members ``keep`` accepts; its RECORD lists exactly those,
    hashes and sizes recomputed (RECORD's own line has none, as the wheel spec says). Signatures of the old
    RECORD go too. Returns the dropped member names."""
    dropped: list[str] = []
    partial = wheel.with_name(wheel.name + ".partial")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(n for n in src.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
        rows = []
        for info in src.infolist():
            if info.filename in (record, record + ".jws", record + ".p7s"):
                continue
            if not keep(info.filename):
                dropped.append(info.filename)
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            if not info.is_dir():
                rows.append([info.filename, urlsafe_digest(data), str(len(data))])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows + [[record, "", ""]])
        dst.writestr(record, text.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    os.replace(partial, wheel)
    return dropped


def trim_ray(wheel: Path) -> list[str]:
    return repack(wheel, lambda name: not name.startswith(RAY_UNUSED))


def trim_bitsandbytes(wheel: Path, cuda: str) -> list[str]:
    """Keep the CPU library and the one for CUDA ``cuda``; drop the other CUDA, ROCm and XPU builds."""
    wanted = "cuda" + cuda.replace(".", "")
    with zipfile.ZipFile(wheel) as archive:
        builds = sorted({m.group(1) for m in map(BNB_LIBRARY.match, archive.namelist()) if m})
    if wanted not in builds:
        cudas = [f"{b[4:-1]}.{b[-1]}" for b in builds if b.startswith("cuda")]
        raise UserError(f"--cuda {cuda}: {wheel.name} has no library for it; it has {', '.join(cudas)}")
    return repack(wheel, lambda name: not (BNB_LIBRARY.match(name) and BNB_LIBRARY.match(name).group(1) != wanted))


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="new (or empty) folder for the wheels")
    parser.add_argument("--python", help="the target's Python, e.g. 3.12 (default: this one)")
    parser.add_argument("--platform", action="append", default=[],
                        help="the target's platform tag, e.g. manylinux_2_28_x86_64, older manylinux tags "
                             "included (repeatable; default: this machine)")
    parser.add_argument("--present", type=Path, metavar="FILE",
                        help="the target's `pip list --format=freeze`: those packages are not downloaded")
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME",
                        help="a package the target will not need, e.g. wandb with W&B off, and its own "
                             "dependencies that nothing else needs (repeatable)")
    parser.add_argument("--trim", action="store_true",
                        help="repack Ray without jars/RLlib/Serve/LLM and bitsandbytes with one CUDA library")
    parser.add_argument("--split", type=float, metavar="MIB",
                        help="sort the wheels into DIR/1, DIR/2, ... of at most MIB each (for transfers of "
                             "limited size; a larger wheel gets a folder of its own)")
    parser.add_argument("--cuda", help="the CUDA version whose bitsandbytes library --trim keeps, e.g. 13.0 "
                                       "(default: the +cuXYZ of torch in --present)")


def check_arguments(args: argparse.Namespace) -> None:
    if args.python is not None and not re.fullmatch(r"3\.\d{1,2}", args.python):
        raise UserError(f"--python {args.python}: give a version such as 3.12")
    for platform in args.platform:
        if not re.fullmatch(r"[a-z0-9_]+", platform):
            raise UserError(f"--platform {platform}: not a platform tag such as manylinux_2_28_x86_64")
    if args.cuda is not None and not re.fullmatch(r"\d{2}\.\d", args.cuda):
        raise UserError(f"--cuda {args.cuda}: give a version such as 13.0")
    if args.split is not None and not args.split > 0:
        raise UserError(f"--split {args.split:g}: give a size in MiB above 0")
    if args.cuda is not None and not args.trim:
        raise UserError(f"--cuda {args.cuda}: only --trim uses it")
    if args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())):
        raise UserError(f"DIR {args.dir}: exists and is not an empty folder")


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    present = read_present(args.present) if args.present else {}
    excluded = {canonical(name) for name in args.exclude}
    if "tune-llama" in excluded:
        raise UserError("--exclude tune-llama: the wheelhouse is for installing it")
    target = target_args(args.python, args.platform)
    cuda = args.cuda or cuda_of(present)
    with tempfile.TemporaryDirectory(prefix="tune-llama-wheel-") as tmp:
        own = build_own_wheel(Path(tmp))
        resolved = resolve(str(own), target, constraints(present), args.python)
        for name in sorted(excluded - {n["name"] for n in resolved}):
            raise UserError(f"--exclude {name}: not among the packages tune-llama needs on the target")
        needed = needed_without(resolved, excluded)
        wanted = [n for n in resolved if n["name"] in needed and n["name"] not in present]
        args.dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(own, args.dir / own.name)
    pins = [f"{n['name']}=={n['version']}" for n in wanted if n["name"] != "tune-llama"]
    if pins:
        pip(["download", "-q", "--no-deps", *target, "-d", str(args.dir), *pins], "downloading the wheels")
    notes = trim(args.dir, cuda) if args.trim else {}
    if args.split:
        split(args.dir, args.split * 2**20)
    print_summary(args, present, excluded, notes)
    return 0


def split(folder: Path, limit: float) -> None:
    """First fit, largest first: few folders, each under ``limit`` bytes."""
    bins: list[list] = []
    for wheel in sorted(folder.glob("*.whl"), key=lambda w: (-w.stat().st_size, w.name)):
        size = wheel.stat().st_size
        home = next((b for b in bins if b[0] + size <= limit), None)
        if home is None:
            home = [0, folder / str(len(bins) + 1)]
            bins.append(home)
            home[1].mkdir()
        home[0] += size
        wheel.rename(home[1] / wheel.name)


def trim(folder: Path, cuda: Optional[str]) -> dict[str, str]:
    notes = {}
    for wheel in sorted(folder.glob("*.whl")):
        before = wheel.stat().st_size
        name = canonical(wheel.name.split("-")[0])
        if name == "ray":
            trim_ray(wheel)
        elif name == "bitsandbytes" and cuda:
            trim_bitsandbytes(wheel, cuda)
        elif name == "bitsandbytes":
            notes[wheel.name] = "not trimmed: no --cuda, and --present names no torch +cuXYZ"
            continue
        else:
            continue
        notes[wheel.name] = f"trimmed {mib(before)} -> {mib(wheel.stat().st_size)}"
    return notes


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def print_summary(args, present: dict, excluded: set[str], notes: dict[str, str]) -> None:
    pattern = "*/*.whl" if args.split else "*.whl"
    wheels = sorted(args.dir.glob(pattern))
    for wheel in wheels:
        print(f"{mib(wheel.stat().st_size):>11}  {wheel.relative_to(args.dir)}"
              + (f"  ({notes[wheel.name]})" if wheel.name in notes else ""))
    for part in sorted(p for p in args.dir.iterdir() if p.is_dir()):
        print(f"{mib(sum(w.stat().st_size for w in part.glob('*.whl'))):>11}  {part}/")
    total = sum(w.stat().st_size for w in wheels)
    skipped = f"; {len(present)} present on the target" if present else ""
    skipped += f"; excluded: {', '.join(sorted(excluded))}" if excluded else ""
    print(f"{len(wheels)} wheels, {mib(total)} in {args.dir}{skipped}")
    print("install on the target (no index needed):")
    print(f"  python -m pip install --no-index --no-deps {args.dir}/{pattern}")
    print("  (or, without write access there: add --target SITE, then put SITE on PYTHONPATH)")


if __name__ == "__main__":  # python -m tune_llama.wheelhouse is tune-llama wheelhouse
    from tune_llama.__main__ import run_command
    run_command("wheelhouse")
