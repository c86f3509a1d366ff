"""What every command-line entry point shares: the common options, defined once, and one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings
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


KNOWN_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]
"""Library warnings every run triggers that say nothing about the user's input (transformers 5 about
peft's own call)."""
KNOWN_LOG_LINES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
                   "kernels._internals.hf_hub": "Skipping publisher trust check"}
"""Logger -> the start of a message it logs on import that reads as an error and is not one: bitsandbytes'
optional CPU kernel for 4-bit layers, which tune-llama never uses on CPU, and (offline, HF_HUB_OFFLINE=1 as in
CI) the ``kernels`` package's note that it looks that kernel up without the hub."""
PROGRESS_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
"""Read by huggingface_hub, transformers and datasets as they are imported (also in Ray's workers, which
inherit the environment): their per-file bars (``Writing model shards``, downloads) would tear our own."""


def quiet_known_noise(verbose: bool) -> None:
    """At a command's start (never on import, so a library user's own settings stand): drop the known harmless
    warnings and third-party progress bars, unless ``--verbose``."""
    if verbose:
        return
    for name in PROGRESS_BAR_SWITCHES:
        os.environ.setdefault(name, "1")
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger, start in KNOWN_LOG_LINES.items():
        logging.getLogger(logger).addFilter(lambda record, start=start: not record.getMessage().startswith(start))


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
