"""Fixtures and helpers shared by the test files: paths, tokenizers (session-scoped: slow to build),
a finished tiny search, the one-line-error check and a reader of Ray's result rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from tune_llama.cli import run_cli
from tune_llama.model import load_tokenizer
from tune_llama.spec import ModelSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "search_spaces" / "tiny.yaml"


def one_line_error(main: Callable, argv: list[str], capsys, code: int = 2) -> str:
    """Run a CLI's ``main`` as its ``python -m`` entry does; it must exit ``code`` with one ``error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def result_rows(experiment: Path) -> dict[str, list[dict]]:
    """Trial folder name -> the rows of its ``result.json`` (one per report), read independently of the package."""
    out = {}
    for result in sorted(experiment.glob("*/result.json")):
        out[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return out


INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items) -> None:
    """The folder is the tier: every test under tests/integration/ gets the ``integration`` marker, so ``-m`` selects
    by tier without each test writing it. The unit tier runs first (``pytest tests`` would take the folders in
    alphabetical order): quick feedback, and in a process no integration test has run in, as ``make test-fast``.
    The order within each tier is kept, so module fixtures are built once as before."""
    def integration(item) -> bool:
        return INTEGRATION_DIR in Path(str(item.path)).resolve().parents
    for item in items:
        if integration(item):
            item.add_marker(pytest.mark.integration)
    items.sort(key=integration)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The real GSM8K rows at ../shared/gsm8k (relative to the repo root); skips only when absent."""
    path = REPO_ROOT.parent / "shared" / "gsm8k"
    if not path.is_dir():
        pytest.skip(f"real GSM8K not found at {path} (expected next to the repository in ../shared/gsm8k)")
    return path


@pytest.fixture(scope="session")
def char_tokenizer():
    """The built-in character tokenizer of ``random:tiny`` models (no BOS added by default)."""
    return load_tokenizer(ModelSpec(name="random:tiny"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer (first use converts the model, ~60 s; then cached)."""
    return load_tokenizer(ModelSpec(name="embedded:smollm2"))


def popen_search(args: list[str], cwd: Path, env_extra: dict | None = None):
    """The search CLI in its own session (so kill_session can end all of it), output into cwd/search.log."""
    import os
    import subprocess
    import sys

    log = (cwd / "search.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "tune_llama.search", *args], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def summary_counts(experiment: Path) -> str:
    """The ``trials:`` line of a finished search's summary."""
    return next(line for line in (experiment / "summary.txt").read_text().splitlines() if line.startswith("trials:"))


# ---------------------------------------------------------------- a finished tiny search, shared

FAKE_SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef", "HF_TOKEN": "hf_secretTOKEN0123456789"}


# Ray's memory monitor kills a worker when the whole host's memory is nearly full, whoever fills it: on a
# machine shared with other users' jobs that made a tiny trial fail at random. These searches use little memory.
NO_HOST_OOM_KILLS = {"RAY_memory_monitor_refresh_ms": "0"}


def run_search(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 900):
    """Run the search CLI in its own process (its own Ray), returning the CompletedProcess."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tune_llama.search", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory) -> Path:
    """A finished 6-trial search on tiny.yaml, one trial at a time (deterministic), W&B offline,
    with fake secrets in the environment. Returns the experiment folder."""
    storage = tmp_path_factory.mktemp("searches")
    proc = run_search([str(TINY), "--name", "tiny", "--storage", str(storage),
                       "--set", "search.max_concurrent=1", "--set", "wandb.mode=offline"],
                      cwd=storage, env_extra=FAKE_SECRETS)
    (storage / "search.log").write_text(proc.stdout + proc.stderr)  # for tests that grep the log lines
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "tiny"


@pytest.fixture(scope="session")
def fake_secrets() -> dict[str, str]:
    """The fake credentials ``tiny_search`` ran with; none may appear in anything it wrote."""
    return dict(FAKE_SECRETS)



# ---------------------------------------------------------------- processes of a search (kill tests)

def proc_stat(pid: int) -> tuple[str, int]:
    """(state letter, session id) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[3])


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def session_processes(session: int, title_prefix: str = "") -> list[int]:
    """Live processes of one session (a search started with start_new_session) whose command starts so."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        try:
            if proc_stat(pid)[1] == session and cmdline(pid).startswith(title_prefix):
                pids.append(pid)
        except (OSError, IndexError, ValueError):
            continue
    return pids


def kill_session(leader) -> None:
    """SIGKILL the search's whole process group, and any Ray worker that left it but not the session."""
    import os
    import signal
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has ended already; the caller's own assertion says why
        pass
    leader.wait()
    for pid in session_processes(leader.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(condition, leader=None, what: str = "the condition", timeout: float = 300, interval: float = 0.2,
               detail=None):
    """``condition()``'s first truthy value, polled every ``interval`` seconds: the one way tests wait for
    something (never a fixed sleep). With ``leader`` (a Popen), it fails as soon as that process has ended;
    ``detail()``, when given, adds what to look at (a log tail) to a failure."""
    import time
    deadline = time.monotonic() + timeout

    def why(text: str) -> str:
        return f"{text}\n{detail()}" if detail else text

    while True:
        value = condition()
        if value:
            return value
        assert leader is None or leader.poll() is None, \
            why(f"the process ended (exit {leader.returncode}) before {what}")
        assert time.monotonic() < deadline, why(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def first_report(experiment: Path, by_epoch: float, checkpoint_kept: bool = False):
    """A condition for ``wait_until``: (trial folder name, worker pid) of a trial that has reported (so
    checkpointed) by fractional epoch ``by_epoch``; result.json's half-written last line is tolerated.

    With ``checkpoint_kept``, also once the trial has trained a step past that report (its live file,
    ``training.log_every=1``): Tune logs a report before it asks the worker for the report's checkpoint, and
    holds the worker at the report until it has that checkpoint; a worker killed in between is retried from
    the checkpoint before."""
    from tune_llama.live import LIVE_DIR, read_live
    from tune_llama.results import read_result_rows

    def reported():
        for folder in sorted(p.parent for p in experiment.glob("*/params.json")):
            rows = read_result_rows(folder / "result.json")
            if not rows or rows[-1]["epoch"] > by_epoch:
                continue
            if checkpoint_kept:
                live = read_live(experiment / LIVE_DIR / f"{rows[-1]['trial_id']}.json")
                if not live or live["step"] <= rows[-1]["step"]:
                    continue
            return folder.name, rows[-1]["pid"]
    return reported


# ---------------------------------------------------------------- W&B offline runs, read as W&B wrote them

def wandb_records(path: Path):
    """The protobuf records of a ``run-ID.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += 7
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # newer W&B versions fill nested_key only


def read_wandb_run(run_dir: Path) -> dict:
    """An offline run as W&B wrote it: the run record, config, history rows, summary, whether it was closed.

    Offline W&B (0.31) writes no ``files/config.yaml`` or ``files/wandb-summary.json``: everything is in
    ``run-ID.wandb``, a log of protobuf records (the summary as a series of updates, the last one wins).
    """
    (log,) = run_dir.glob("run-*.wandb")
    run, config, history, summary, closed = None, {}, [], {}, False
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({wandb_item_key(u): json.loads(u.value_json) for u in run.config.update})
        elif kind == "config":
            config.update({wandb_item_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({wandb_item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary.update({wandb_item_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "exit":
            closed = True
    assert run is not None, f"{log} holds no run record"
    config.pop("_wandb", None)  # W&B's own bookkeeping
    return {"run": run, "config": config, "history": history, "summary": summary, "closed": closed}


def wandb_run_closed(run_dir: Path, timeout: float = 30.0) -> Path:
    """``run.finish()`` returns before W&B's service has written the run's last records (they reach the file
    within a second, or at the latest when the process exits): wait for the exit record."""
    def closed():
        logs = list(run_dir.glob("run-*.wandb"))
        return bool(logs) and any(r.WhichOneof("record_type") == "exit" for r in wandb_records(logs[0]))
    wait_until(closed, what=f"{run_dir}'s exit record after the run was finished", timeout=timeout)
    return run_dir
