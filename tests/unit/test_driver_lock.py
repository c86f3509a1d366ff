"""One driver per search folder: a live process holds the folder's lock, a second driver is refused in one line
naming it, and a killed driver's lock is free at once (real processes, the real lock)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tune_llama.driver import DRIVER_FILE, DriverLock, FolderLocked, driver_alive, lock_held, refuse_if_locked

HOLD = ("import sys, time; from tune_llama.driver import DriverLock; lock = DriverLock(sys.argv[1]).take(); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path`` as a search's driver."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_folder_held_by_a_live_driver_is_refused_in_one_line_naming_its_pid_and_host(tmp_path, holder):
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(FolderLocked) as refused:
        DriverLock(tmp_path).take()
    line = str(refused.value)
    assert "\n" not in line and str(tmp_path) in line and f"pid {holder.pid} on {socket.gethostname()}" in line
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before, "the refused driver wrote something"
    assert driver_alive(tmp_path) and lock_held(tmp_path)


def test_a_killed_driver_leaves_its_folder_free_even_when_its_pid_is_reused(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # The pid in driver.json now names a live process that is not a driver (this one): the lock says no driver.
    (tmp_path / DRIVER_FILE).write_text(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname()}))
    assert not lock_held(tmp_path) and not driver_alive(tmp_path)
    refuse_if_locked(tmp_path)
    lock = DriverLock(tmp_path).take()
    try:
        assert json.loads((tmp_path / DRIVER_FILE).read_text())["pid"] == os.getpid()
        assert lock_held(tmp_path)  # seen from this process too: readers in the driver see it alive
    finally:
        lock.release()


def test_a_reader_probing_the_lock_does_not_keep_a_driver_out(tmp_path):
    for _ in range(50):  # probes and a driver's take interleave freely
        lock_held(tmp_path)
    lock = DriverLock(tmp_path).take()
    lock.release()
    assert not lock_held(tmp_path)


def test_a_search_folder_of_an_older_version_without_a_lock_file_falls_back_on_the_pid(tmp_path):
    (tmp_path / DRIVER_FILE).write_text(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname()}))
    assert lock_held(tmp_path) is None and driver_alive(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / DRIVER_FILE).write_text(json.dumps({"pid": dead.pid, "hostname": socket.gethostname()}))
    time.sleep(0.1)
    assert not driver_alive(tmp_path)
