"""One command for the whole pipeline: ``tune-llama COMMAND ...``.

Each subcommand is a module with ``add_arguments(parser)`` and ``main(args)``;
this is the one parser: ``python -m tune_llama.MODULE ...`` is ``tune-llama COMMAND ...``
(each module's ``__main__`` block calls ``run_command``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from tune_llama.cli import quiet_known_noise, run_cli

COMMANDS = {
    "search": ("tune_llama.search", "search a spec's hyperparameters (Optuna + successive halving on Ray Tune); --resume"),
    "report": ("tune_llama.report", "compare a search's trials: table, plots, parameter importance, report.html"),
    "export": ("tune_llama.export", "write a search's best trial as a ready-to-use Hugging Face model"),
    "evaluate": ("tune_llama.evaluate", "GSM8K accuracy of a model (strict and flexible, with 95 percent intervals)"),
    "train": ("tune_llama.train", "fine-tune one configuration of a spec, without Ray"),
    "data": ("tune_llama.data.__main__", "split sizes, token lengths and padding of a spec's data"),
    "demo": ("tune_llama.demo", "search, export and score SmolLM2 on GSM8K problems offline on CPU (make demo)"),
    "wheelhouse": ("tune_llama.wheelhouse", "the wheels a machine without a package index lacks, for an offline install"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The top parser; only the chosen subcommand's module is imported (``--help`` stays fast)."""
    parser = argparse.ArgumentParser(prog="tune-llama", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        child = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            importlib.import_module(module).add_arguments(child)
            try:
                child.add_argument("--verbose", action="store_true",
                                   help="show the libraries' own warnings and progress bars")
            except argparse.ArgumentError:
                pass  # the command has a --verbose of its own (search: Ray's output too)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_known_noise("--verbose" in argv)  # before the command's module imports the libraries
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(args)


def command(name: str) -> Callable[[list[str] | None], int]:
    """``tune-llama NAME ARGS...`` as a function of ARGS (``sys.argv[1:]`` when None)."""
    def run_named(argv: list[str] | None = None) -> int:
        return main([name, *(sys.argv[1:] if argv is None else argv)])
    return run_named


def run_command(name: str, argv: list[str] | None = None) -> None:
    """``python -m tune_llama.MODULE``: the subcommand ``name`` with one-line errors, then exit."""
    run_cli(command(name), argv)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
