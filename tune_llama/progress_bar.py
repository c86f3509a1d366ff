"""What a long run prints as it goes: a bar with an ETA, or plain lines where nobody watches a terminal, and
the timestamped line of a search's own progress.

``Progress`` is the bar of a long single run (``train``, ``evaluate``): a tqdm bar with an ETA on a
terminal; elsewhere (Slurm logs, ``nohup``) a plain line every 30 s and one at the end, since a redrawn bar
is one endless line of carriage returns in a file. Imports nothing of Ray: ``train`` and ``evaluate`` run
without it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, TextIO

WIDTH = 100
"""Columns of a bar where the terminal has no size, and of the search's trial table."""
PLAIN_EVERY_S = 30.0
"""Seconds between plain lines where the output is not a terminal (a log file)."""


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def terminal_columns(stream: TextIO) -> int:
    """The terminal's width, or 0 when it cannot be told (a pty nobody sized, a stream without a file)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        return 0


def format_duration(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on (tqdm's format)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def eta_seconds(done: int, left: int, elapsed: float) -> Optional[float]:
    """Seconds for ``left`` more units at the average rate of the ``done`` ones; None before the first."""
    if done <= 0:
        return None
    return max(left, 0) * elapsed / done


def plain_line(desc: str, position: int, total: int, unit: str, elapsed: float, done: int,
               final: bool = False) -> str:
    """``desc: 120/400 steps (30%), 02:01 elapsed, ETA 04:42``; at the end ``... in 06:43``.
    ``done`` counts the units of this process only (a resumed run's ETA is not flattered by its start)."""
    percent = f" ({position / total:.0%})" if total > 0 else ""
    head = f"{desc}: {position}/{total} {unit}s{percent}"
    if final:
        return f"{head} in {format_duration(elapsed)}"
    eta = eta_seconds(done, total - position, elapsed)
    return f"{head}, {format_duration(elapsed)} elapsed, ETA {format_duration(eta) if eta is not None else '?'}"


class Progress:
    """``Progress(total, desc, unit)``; ``update(n)`` as work is done, ``close()`` (or ``with``) at the end.

    On a terminal it is a tqdm bar with rate and ETA. Elsewhere it prints ``plain_line`` at most every
    ``every`` seconds (when an update comes) and once more at ``close``. ``write`` prints a line without
    tearing the bar.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0,
                 every: float = PLAIN_EVERY_S, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.position = self.initial = initial
        self.start = self.last_line = clock()
        self.closed = False
        self.bar = None
        if is_tty(self.stream):
            from tqdm.auto import tqdm
            # Follow the terminal's size; where it has none (an unsized pty), tqdm would draw nothing.
            width = {"dynamic_ncols": True} if terminal_columns(self.stream) > 0 else {"ncols": WIDTH, "nrows": 24}
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            mininterval=1.0, **width)

    def update(self, n: int = 1) -> None:
        self.position += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self.last_line >= self.every:
            self._line()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        now = self.clock()
        self.last_line = now
        print(plain_line(self.desc, self.position, self.total, self.unit, now - self.start,
                         self.position - self.initial, final), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def say(line: str, stream: Optional[TextIO] = None) -> None:
    """A line of a search's own progress, timed as the table's titles are."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=stream or sys.stdout, flush=True)


def format_value(value: Any, fmt: str = ".3g") -> str:
    """A param or metric in a table cell: floats by ``fmt``, nothing as ``-``."""
    if value is None:
        return "-"
    return format(value, fmt) if isinstance(value, float) else str(value)
