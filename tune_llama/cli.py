"""What every command-line entry point shares: the common options, defined once, and one-line errors."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, NoReturn

from tune_llama.errors import UserError


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a spec field, e.g. --set training.lr=3e-4 (repeatable)",
    )


def add_search_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """--name and --storage: where a search lives (STORAGE/NAME)."""
    parser.add_argument("--name", help="search name (default: the spec's stem and a timestamp)")
    parser.add_argument("--storage", type=Path, help="folder that holds searches (default results/)")


def shell_path(path: Path | str) -> str:
    """``path`` as a printed command should hold it: relative when under the working folder, quoted for the
    shell (a folder name with spaces stays one argument when the line is pasted)."""
    path = Path(path)
    shown = os.path.relpath(path) if path.is_absolute() and path.is_relative_to(Path.cwd()) else str(path)
    return shlex.quote(shown)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run ``main`` and turn user errors into one line on stderr with exit code 2."""
    try:
        code = main(argv)
    except UserError as err:  # SpecError and CheckpointError included
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except FileNotFoundError as err:
        fail(f"not found: {err.filename or err}")
    except OSError as err:
        # A full disk or a read-only folder: say which file, keep what was written.
        fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    raise SystemExit(code or 0)
