"""What every command-line entry point shares: --set overrides and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from tune_llama.errors import SpecError, UserError


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a spec field, e.g. --set training.lr=3e-4 (repeatable)",
    )


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run ``main`` and turn user errors into one line on stderr with exit code 2."""
    try:
        code = main(argv)
    except (SpecError, UserError) as err:
        fail(str(err))
    except FileNotFoundError as err:
        fail(f"not found: {err.filename or err}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    raise SystemExit(code or 0)
