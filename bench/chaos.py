"""Kill a search anywhere: SIGKILL its whole process group at random moments, resume it each time, and check
that what it leaves still adds up.

    nice .venv/bin/python bench/chaos.py --kills 20          # 20 kills, then one last resume to the end
    .venv/bin/python bench/chaos.py --smoke-test             # 3 kills (the integration test runs this)
    .venv/bin/python bench/chaos.py --kills 5 --seed 3 --json

Runs a halving search with pauses at its rungs (``search_spaces/tiny.yaml``, 8 trials, 2 at once, a report
every 0.25 epoch) as ``tune-llama search`` in its own session, and SIGKILLs that session (driver, Ray, trial
processes) ``--kills`` times, each at a random moment (seeded by ``--seed``): a random time into the run, or
just after a random few more reports were checkpointed (``kill_moment``); every run after the first is
``tune-llama search --resume DIR``. Once the kills are spent it resumes until the
search ends. A run that ends before its kill moment is not killed (that kill is drawn again for the next run).

While a run holds the folder, a second ``--resume`` must be refused (one driver per folder). After each kill
and at the end, the invariants, checked from the files alone:

- one driver: the killed session has no process left and the folder's lock is free; while a run held the
  lock, driver.json named that run;
- no trial starts over: a trial's result rows never come back to its first report's step after having gone
  past it (a resumed trial continues from its checkpoint);
- one state per trial: every trial reads as one of the states the tool prints, and the records of the
  scheduler (``scheduler.json``) name only trials the folder has;
- at the end: exit 0; the summary's counts add up to the trials, and every trial ended normally; the study
  (``optuna.db``) holds exactly those trials (matched by params), ended as the folders say (finished: complete,
  stopped at a rung: pruned), none running; ``scheduler.json`` waits for no trial and its stopped trials are the
  ones stopped at a rung; ``export`` takes the best checkpoint on disk.

Prints ``kills survived: K of N`` and, for each kill after which something broke, the first broken invariant.
A bench, not a test; ``tests/integration/test_chaos.py`` runs ``--smoke-test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

TINY = common.REPO / "search_spaces" / "tiny.yaml"
SEARCH = ["--set", "training.eval_every=0.25", "--set", "search.num_samples=8", "--set", "search.max_concurrent=2"]
NAME = "chaos"
EXPECTED_PRUNED, EXPECTED_COMPLETE = "PRUNED", "COMPLETE"


# ---------------------------------------------------------------- runs and kills

def session_pids(session: int) -> list[int]:
    """Live processes of one session (a run started with start_new_session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group, then any process of its session that left the group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 30
    while session_pids(proc.pid) and time.monotonic() < deadline:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def start_run(storage: Path, folder: Path, resume: bool, log: Path) -> subprocess.Popen:
    argv = ["--resume", str(folder)] if resume else [str(TINY), "--name", NAME, "--storage", str(storage), *SEARCH]
    with log.open("a") as out:
        out.write(f"\n===== {'resume' if resume else 'search'} at {time.strftime('%H:%M:%S')}\n")
        out.flush()
        return subprocess.Popen([sys.executable, "-m", "tune_llama.search", *argv], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=storage,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_memory_monitor_refresh_ms": "0"})


def second_driver_refused(folder: Path) -> str | None:
    """A second ``--resume`` on the held folder: None when it is refused as it must be, else what went wrong."""
    before = (folder / "driver.json").read_bytes() if (folder / "driver.json").exists() else None
    proc = subprocess.run([sys.executable, "-m", "tune_llama.search", "--resume", str(folder)], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 2 or "being searched by another tune-llama" not in proc.stderr:
        return f"a second --resume on the running search exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    if before is not None and (folder / "driver.json").read_bytes() != before:
        return "the refused second --resume rewrote driver.json"
    return None


def checkpoints(folder: Path) -> int:
    """Reports the trials have checkpointed into the search folder so far: each trial's newest checkpoint's
    number (Ray numbers them from 0 and deletes all but ``search.keep_checkpoints``), summed."""
    newest: dict[str, int] = {}
    for path in folder.glob("*/checkpoint_*"):
        number = int(path.name.rsplit("_", 1)[1]) if path.name.rsplit("_", 1)[1].isdigit() else -1
        newest[path.parent.name] = max(newest.get(path.parent.name, -1), number)
    return sum(n + 1 for n in newest.values())


def kill_moment(rng: random.Random, max_delay: float):
    """When to kill the next run, as a test of the run (called every 0.2 s, true once it is time): up to 2 s
    after a random 1 to 4 more reports were checkpointed (a report being saved, a trial pausing at a rung or
    going on), or, half the time, at a random moment of its first ``max_delay`` seconds if that comes first
    (Ray starting, preflight, trials loading, a trial at work). Counting reports keeps each run's progress
    short, so the kills land all over a search however fast the machine is."""
    seconds = rng.uniform(0.5, max_delay) if rng.random() < 0.5 else math.inf
    reports, jitter = rng.randint(1, 4), rng.uniform(0.0, 2.0)
    there = None  # when the reports were there

    def due(started, folder, seen):
        nonlocal there
        if there is None and checkpoints(folder) >= seen + reports:
            there = time.monotonic()
        return time.monotonic() - started >= seconds or (there is not None and time.monotonic() - there >= jitter)
    at = f"at {seconds:.1f} s or " if seconds < math.inf else ""
    return f"{at}{jitter:.1f} s after {reports} more reports", due


def drive(proc: subprocess.Popen, folder: Path, due) -> tuple[bool, str | None]:
    """Watch a run until ``due(started, folder, reports before)`` says it is time: (whether it still ran then,
    the first broken invariant)."""
    from tune_llama.driver import driver_record, lock_held
    probed, broken = False, None
    started, seen = time.monotonic(), checkpoints(folder)
    while not due(started, folder, seen):
        if proc.poll() is not None:
            return False, broken
        if lock_held(folder):
            record = driver_record(folder)
            if broken is None and record.get("pid") not in (None, proc.pid):
                broken = f"one driver: the lock is held while driver.json names pid {record.get('pid')}, not {proc.pid}"
            # Probe once the live driver has written its record: it takes the lock first and writes driver.json
            # just after, so a probe in between would see its own write as the refused driver's.
            if not probed and broken is None and record.get("pid") == proc.pid:
                probed = True
                broken = second_driver_refused(folder)
        time.sleep(0.2)
    return proc.poll() is None, broken


# ---------------------------------------------------------------- invariants

def raw_rows(folder: Path) -> dict[str, list[dict]]:
    """Trial folder name -> every row of its result.json as written (repeats kept)."""
    out = {}
    for result in folder.glob("*/result.json"):
        rows = []
        for line in result.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a half-written last line
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        out[result.parent.name] = rows
    return out


def started_over(folder: Path) -> str | None:
    for name, rows in sorted(raw_rows(folder).items()):
        first, furthest = (rows[0]["step"], rows[0]["step"]) if rows else (None, None)
        for row in rows[1:]:
            if row["step"] == first and furthest > first:
                return (f"no trial starts over: {name[:40]} reported step {first} again after reaching step "
                        f"{furthest} (rows {[r['step'] for r in rows]})")
            furthest = max(furthest, row["step"])
    return None


def at_rest(folder: Path, session: int) -> str | None:
    """The invariants of a folder whose driver was just killed."""
    from tune_llama.driver import lock_held
    from tune_llama.results import TRIAL_STATES, load_search
    left = session_pids(session)
    if left:
        return f"one driver: processes of the killed run are still alive: {left}"
    if lock_held(folder):
        return "one driver: the folder is still locked after its driver was killed"
    broken = started_over(folder)
    if broken or not (folder / "tune_llama_spec.json").exists():
        return broken
    search = load_search(folder)
    for trial in search.trials:
        if search.status(trial) not in TRIAL_STATES:
            return f"one state per trial: {trial.trial_id} reads as {search.status(trial)!r}"
    known = {t.trial_id for t in search.trials}
    scheduler = read_json(folder / "scheduler.json") or {}
    named = scheduler_ids(scheduler)
    if named - known:
        return f"records agree: scheduler.json names trials the folder does not have: {sorted(named - known)}"
    return None


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def scheduler_ids(state: dict) -> set[str]:
    ids = set(state.get("waiting", {})) | set(state.get("promoted", [])) | set(state.get("stopped", []))
    for rung in state.get("recorded", []):
        ids |= set(rung)
    return ids


def study_trials(folder: Path):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def params_key(params: dict) -> str:
    return json.dumps({k: round(v, 12) if isinstance(v, float) else v for k, v in sorted(params.items())})


def best_checkpoint_on_disk(folder: Path, metric: str, mode: str, epochs: float) -> Path | None:
    """From the files alone: the best checkpoint (with weights, by its own metrics.json) of the trials that
    trained to full length, of any trial when none did."""
    found = []
    for trial in [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("train_trial_")]:
        rows = raw_rows(folder).get(trial.name, [])
        full = bool(rows) and (rows[-1]["epoch"] >= epochs - 1e-9 or rows[-1].get("status") in
                               ("completed", "early_stopped"))
        for ckpt in sorted(trial.glob("checkpoint_*")):
            metrics = read_json(ckpt / "metrics.json")
            value = metrics.get(metric) if isinstance(metrics, dict) else None
            if (ckpt / "trainable.safetensors").exists() and isinstance(value, (int, float)) and math.isfinite(value):
                found.append((not full, value if mode == "min" else -value, ckpt))
    return min(found, key=lambda f: (f[0], f[1]))[2] if found else None


def at_end(folder: Path, code: int, log: Path) -> str | None:
    from tune_llama.results import NORMAL_ENDS, RUNG_STOPPED, load_search
    if code != 0:
        return f"the search ends: the last resume exited {code} (log: {log})"
    broken = at_rest(folder, session=-1)
    if broken:
        return broken
    search = load_search(folder)
    states = {t.trial_id: search.status(t) for t in search.trials}
    summary = (folder / "summary.txt").read_text()
    line = next((ln for ln in summary.splitlines() if ln.startswith("trials:")), "")
    numbers = [int(n) for n in re.findall(r"\d+", line)]
    if len(numbers) < 3 or numbers[0] != len(states) or sum(numbers[2:]) != numbers[0]:
        return f"counts add up: the summary says {line!r} for {len(states)} trials"
    if len(states) != search.spec.search.num_samples or set(states.values()) - set(NORMAL_ENDS):
        return f"every trial ended normally: {sorted(states.values())} of {search.spec.search.num_samples} wanted"
    study = study_trials(folder)
    unfinished = [t.number for t in study if not t.state.is_finished()]
    if unfinished:
        return f"records agree: optuna.db holds unfinished trials: {unfinished}"
    folders = sorted((params_key(t.params), EXPECTED_PRUNED if states[t.trial_id] == RUNG_STOPPED
                      else EXPECTED_COMPLETE) for t in search.trials)
    studied = sorted((params_key(t.params), t.state.name) for t in study if t.state.name != "FAIL")
    if folders != studied:
        return f"records agree: the trial folders say {folders} but optuna.db says {studied}"
    # Besides them, only trials told failed: those a driver asked for as it was killed, before Tune saved them.
    scheduler = read_json(folder / "scheduler.json") or {}
    if scheduler.get("waiting"):
        return f"records agree: scheduler.json still waits for {scheduler['waiting']}"
    stopped = {t for t, s in states.items() if s == RUNG_STOPPED}
    if set(scheduler.get("stopped", [])) != stopped:
        return (f"records agree: scheduler.json stopped {sorted(set(scheduler.get('stopped', [])))}, the folders "
                f"say {sorted(stopped)} stopped at a rung")
    best = best_checkpoint_on_disk(folder, search.metric, search.mode, search.spec.training.epochs)
    proc = subprocess.run([sys.executable, "-m", "tune_llama.export", str(folder), "--by", "loss"],
                          capture_output=True, text=True, timeout=600)
    exported = read_json(folder / "export" / "export.json") or {}
    if proc.returncode != 0 or Path(exported.get("checkpoint", "")) != best:
        return f"export takes the best checkpoint on disk ({best}): it took {exported.get('checkpoint')} " \
               f"(exit {proc.returncode}: {proc.stderr.strip()[-300:]})"
    return None


# ---------------------------------------------------------------- the bench

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=30.0,
                   help="a kill timed in seconds comes up to this long after its run starts (default %(default)s)")
    p.add_argument("--storage", type=Path, help="where the search goes (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="3 kills: checks the bench works end to end")
    args = p.parse_args(argv)
    if args.smoke_test and args.kills == p.get_default("kills"):
        args.kills = 3
    rng = random.Random(args.seed)
    storage = (args.storage or Path(tempfile.mkdtemp(prefix="chaos-"))).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    folder, log = storage / NAME, storage / "runs.log"
    common.say(f"machine: cpu x{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; {args.kills} kills, seed "
               f"{args.seed}, into {folder} (runs: {log})")
    failures: dict[int, str] = {}
    kills, code = 0, None
    while kills < args.kills:
        when, due = kill_moment(rng, args.max_delay)
        proc = start_run(storage, folder, resume=(folder / "tune_llama_spec.json").exists(), log=log)
        running, broken = drive(proc, folder, due)
        if not running:  # it ended (or failed) before its kill: the search may be over already
            code = proc.wait()
            if broken:
                failures.setdefault(kills, broken)
            if code == 0:
                break
            if code != 3:
                failures.setdefault(kills, f"a run exited {code} before its kill (log: {log})")
                break
            continue
        kill_session(proc)
        kills += 1
        broken = broken or at_rest(folder, proc.pid)
        common.say(f"kill {kills} {when}: {broken or 'ok'}")
        if broken:
            failures.setdefault(kills, broken)
    for _ in range(10):  # the last resumes, unkilled, until the search ends
        if code == 0:
            break
        proc = start_run(storage, folder, resume=True, log=log)
        _, broken = drive(proc, folder, lambda *_: False)
        code = proc.wait()
        if broken:
            failures.setdefault(max(kills, 1), broken)
        if code not in (0, 3):
            break
    broken = at_end(folder, code if code is not None else -1, log)
    if broken:
        failures.setdefault(max(kills, 1), broken)
    survived = kills - len([k for k in failures if k >= 1])
    if args.json:
        print(json.dumps({"kills": kills, "survived": survived, "failures": failures, "folder": str(folder)}))
    else:
        print(f"kills survived: {survived} of {kills}")
        for kill, what in sorted(failures.items()):
            print(f"  after kill {kill}: {what}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
