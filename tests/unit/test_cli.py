"""The command line's shared pieces: printed commands that paste back into a shell, and ``python -m``."""

from __future__ import annotations

import shlex
import subprocess
import sys

from tune_llama.cli import shell_path


def test_a_printed_path_with_spaces_and_quotes_pastes_back_as_one_argument(tmp_path, monkeypatch):
    folder = tmp_path / "results" / "my search's run"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    line = f"tune-llama export {shell_path(folder)}"
    assert shlex.split(line) == ["tune-llama", "export", "results/my search's run"]
    assert shlex.split(shell_path(folder.parent.parent.parent)) == [str(folder.parent.parent.parent)], \
        "outside the working folder: absolute"


def test_python_dash_m_of_a_module_is_the_same_command_as_tune_llama():
    by_module = subprocess.run([sys.executable, "-m", "tune_llama.export", "--help"], capture_output=True, text=True)
    by_command = subprocess.run([sys.executable, "-m", "tune_llama", "export", "--help"], capture_output=True,
                                text=True)
    assert by_module.returncode == by_command.returncode == 0
    assert by_module.stdout == by_command.stdout and "usage: tune-llama export" in by_module.stdout


def test_every_option_of_every_subcommand_has_a_help_text():
    import argparse
    from tune_llama.__main__ import COMMANDS, build_parser
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:  # argparse has no public list of a parser's arguments
            if isinstance(action, argparse._SubParsersAction):
                for child_name, child in action.choices.items():
                    walk(child, f"{name} {child_name}".strip())
            elif not action.help and "-h" not in action.option_strings:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    for command in COMMANDS:
        walk(build_parser(command), "")
    assert missing == []
