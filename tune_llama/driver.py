"""The one process that writes a search folder (its driver): an OS lock on the folder for the driver's whole
life, and the record of who holds it.

    results/NAME/driver.lock    locked (``flock``, through ``filelock``) while a driver runs; the kernel drops
                                the lock when the process ends, SIGKILL included, so a stale lock cannot be
    results/NAME/driver.json    pid and host of the driver that took the lock last

A second ``search`` or ``search --resume`` on a locked folder is refused before it writes anything (the lock
is tried before Ray starts); ``report``, ``export`` and ``evaluate`` only read and never take it. Readers ask
whether a driver is alive by probing the lock with a shared, non-blocking ``flock`` on a read-only descriptor
(no write, and the file is left as it is); where the folder has no lock file (a search of an older
tune-llama) or the filesystem has no ``flock``, by the pid in ``driver.json``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Optional

from tune_llama.errors import UserError
from tune_llama.paths import read_json, replace_file

DRIVER_FILE = "driver.json"
DRIVER_LOCK = "driver.lock"
TAKE_LOCK_S = 5.0
"""How long a driver waits for the lock: a reader's probe holds it for microseconds, a driver for its life."""


class FolderLocked(UserError):
    """Another live driver holds the search folder."""


def write_driver_file(path: Path) -> None:
    """Record the search process, so a reader can tell a running search from one whose process is gone; whole
    or not at all (a reader never sees it half-written)."""
    replace_file(path / DRIVER_FILE, json.dumps({"pid": os.getpid(), "hostname": socket.gethostname()}).encode())


def driver_record(path: Path) -> dict[str, Any]:
    record = read_json(Path(path) / DRIVER_FILE)
    return record if isinstance(record, dict) else {}


def lock_held(path: Path) -> Optional[bool]:
    """Whether a live process holds the folder's lock; None where that cannot be told (no lock file, a
    filesystem without ``flock``)."""
    try:
        fd = os.open(Path(path) / DRIVER_LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as err:
        return True if err.errno in (errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


def driver_alive(path: Path) -> bool:
    """Whether the process that runs (ran) the search in ``path`` is still there: its lock, else its pid."""
    held = lock_held(path)
    return held if held is not None else process_alive(driver_record(path))


def process_alive(info: dict[str, Any]) -> bool:
    """``{"pid", "hostname"}`` names a live process (unknowable on another host: yes; unknown: no)."""
    pid, host = info.get("pid"), info.get("hostname")
    if not isinstance(pid, int):
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def locked_line(path: Path) -> str:
    record = driver_record(path)
    who = (f"pid {record['pid']} on {record.get('hostname', 'an unknown host')}" if isinstance(record.get("pid"), int)
           else "a process that is still starting")
    return (f"{path} is being searched by another tune-llama ({who}); only one search may write a folder: "
            "wait for it to end, or stop it, then --resume")


def refuse_if_locked(path: Path) -> None:
    """One line naming the folder and its live driver when a driver holds ``path``; writes nothing."""
    if lock_held(path):
        raise FolderLocked(locked_line(path))


class DriverLock:
    """The driver's hold on a search folder, from before Ray starts until the process ends (``release`` at
    the end of the command; a killed driver's hold ends with it). Taking it writes ``driver.json``. Keep the
    object referenced while the folder is held: a collected ``FileLock`` lets go of its lock."""

    def __init__(self, path: Path):
        from filelock import FileLock  # not for readers: they only probe
        self.path = Path(path)
        self.lock = FileLock(str(self.path / DRIVER_LOCK))

    def take(self) -> "DriverLock":
        from filelock import Timeout
        refuse_if_locked(self.path)  # at once, without waiting, where another driver is plainly there
        try:
            self.lock.acquire(timeout=TAKE_LOCK_S)
        except Timeout:
            raise FolderLocked(locked_line(self.path)) from None
        write_driver_file(self.path)
        return self

    def release(self) -> None:
        if self.lock.is_locked:
            self.lock.release()


@contextlib.contextmanager
def new_search_folder(path: Path) -> Iterator[DriverLock]:
    """Create a new search's folder and take its lock (before Ray starts); when the block fails (bad input found
    while Ray starts), remove what was created, so a refused search leaves nothing behind."""
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    lock = DriverLock(path).take()
    try:
        yield lock
    except BaseException:
        lock.release()
        for leftover in (path / DRIVER_FILE, path / DRIVER_LOCK):
            leftover.unlink(missing_ok=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
