"""Every exception type tune-llama raises on purpose, and how an error reads as one line, at the bottom of the
package (imports nothing of it).

Ray moves exceptions between processes with pickle, so each type here must
survive ``pickle`` and ``copy``: an exception whose ``__init__`` takes other
arguments than its message needs a ``__reduce__`` that rebuilds it.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad input the user can fix: printed as one line, exit code 2."""


class SpecError(UserError, ValueError):
    """A bad spec value. ``str(err)`` is a one-line message naming the field path."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self):
        return (type(self), (self.path, self.message))


class TrialOutOfMemory(RuntimeError):
    """CUDA ran out of memory in a trial; the message says what to change."""


class CheckpointError(UserError):
    """A checkpoint folder that cannot be read (truncated, foreign, from another model)."""


class SearchFailed(RuntimeError):
    """Every trial of a search errored."""


ALL = (UserError, SpecError, TrialOutOfMemory, CheckpointError, SearchFailed)


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``: an error from a library, quoted inside one of ours."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
