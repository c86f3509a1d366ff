"""A long search: does the driver stay flat, do trials start promptly, do report and export keep up?

    nice .venv/bin/python bench/scale.py                 # 200 tiny trials, 4 at a time (15+ min on 2 cores)
    nice .venv/bin/python bench/scale.py --trials 50     # smaller; rows at 10 / 50
    .venv/bin/python bench/scale.py --json               # one JSON object
    .venv/bin/python bench/scale.py --smoke-test         # 10 trials, 2 at a time: checks it runs

Runs ``search_spaces/tiny.yaml`` as a search of ``--trials`` trials, ``--concurrent`` at a time (each
``search.resources.cpu`` = cores / concurrent), one epoch with two reports per trial (ASHA may stop a
trial at the first), through ``tune-llama search`` (``tune_llama.__main__.command``) in this process, so this process is the search's
driver. A sampler thread reads, when 10 / 50 / 100 / 200 trials (and ``--trials``) have started:

- the driver's RSS (this process, ``/proc/self/status``);
- Ray's object store use (the plasma bytes the raylet's ``debug_state.txt`` says are pinned);
- per-trial scheduling overhead since the previous row: slot-seconds (wall time x concurrent) not spent
  inside a trial's own ``time_total_s``, per trial that started; the trial's start-up in its worker
  (imports, model build) counts as trial time, Tune's scheduling, process reuse and result handling do not;
- the size of ``optuna.db``.

After the search: the wall time of ``tune-llama report`` and ``tune-llama export`` on the finished folder,
each as a user runs it (its own process). Goals: driver RSS at 200 trials <= 1.3 x at 50;
overhead <= 1 s per trial; report <= 15 s. Printed with their ratios; a bench, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

TINY = common.REPO / "search_spaces" / "tiny.yaml"
MARKS = (10, 50, 100, 200)


def rss_mb() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text)[1]) / 1024


def object_store_mb() -> float | None:
    """Object store (plasma) memory the search's objects pin, from the raylet's ``debug_state.txt`` (None
    before Ray is up). Ray's readers (``ray memory``, ``memory_summary``) need grpcio, which Ray's minimal
    install lacks; the raylet rewrites this file in its session folder every 10 s. Bench only."""
    from tune_llama.ray_private import session_dir
    try:
        session = session_dir()
        if session is None:
            return None
        text = (session / "logs" / "debug_state.txt").read_text()
    except Exception:  # a bench reading: a failed read is a blank cell, not a failed run
        return None
    match = re.search(r"pinned objects size: (\d+)", text)
    return int(match[1]) / 2**20 if match else None


def trial_seconds(experiment: Path) -> tuple[int, float]:
    """(trials started, the sum of each one's latest ``time_total_s``)."""
    from tune_llama.results import read_result_rows
    folders = sorted(p.parent for p in experiment.glob("*/params.json"))
    total = 0.0
    for folder in folders:
        rows = read_result_rows(folder / "result.json")
        total += float(rows[-1].get("time_total_s", 0.0)) if rows else 0.0
    return len(folders), total


class Sampler(threading.Thread):
    def __init__(self, experiment: Path, marks: list[int], concurrent: int, total: int):
        super().__init__(daemon=True)
        self.experiment, self.marks, self.concurrent, self.total = experiment, marks, concurrent, total
        self.rows: list[dict] = []
        self.start_time = time.monotonic()
        self.last = (self.start_time, 0, 0.0)
        self.done = threading.Event()

    def sample(self, label: str, started: int, busy: float) -> None:
        now = time.monotonic()
        then, trials_then, busy_then = self.last
        new = started - trials_then
        overhead = ((now - then) * self.concurrent - (busy - busy_then)) / new if new else float("nan")
        db = self.experiment / "optuna.db"
        self.rows.append({"trials": label, "driver_rss_mb": rss_mb(), "object_store_mb": object_store_mb(),
                          "overhead_s": overhead, "optuna_db_kb": db.stat().st_size / 1024 if db.exists() else 0,
                          "wall_s": now - self.start_time})
        self.last = (now, started, busy)
        common.say(f"{label} trials: {self.rows[-1]}")

    def run(self) -> None:
        pending = list(self.marks)
        while pending and not self.done.wait(1.0):
            started, busy = trial_seconds(self.experiment)
            while pending and started >= min(pending[0] + self.concurrent, self.total):
                # The mark's trials have all ended once `concurrent` more have started.
                self.sample(str(pending.pop(0)), started - self.concurrent, busy)

    def finish(self) -> None:
        self.done.set()
        self.join()
        started, busy = trial_seconds(self.experiment)
        if not self.rows or self.rows[-1]["trials"] != str(started):
            self.sample(str(started), started, busy)


def timed_command(*argv: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        common.say(proc.stderr[-2000:])
        return float("nan")
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--storage", type=Path, help="where the search goes (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory", action="store_true",
                   help="the trial processes' memory instead: SmolLM2 + LoRA, --trials (default 12) one at a time per "
                        "scheduler, against a fresh process running one trial")
    common.add_smoke_test(p)
    args = p.parse_args(argv)
    if args.memory:
        return memory_main(args, p)
    common.smoke_test(args, p, trials=10, concurrent=2)
    from tune_llama.__main__ import command

    cpus = os.cpu_count() or 1
    storage = (args.storage or Path(tempfile.mkdtemp(prefix="scale-"))).resolve()
    experiment = storage / "scale"
    marks = [m for m in MARKS if m < args.trials]
    common.say(f"machine: cpu x{cpus}, load average {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}; "
               f"{args.trials} trials, {args.concurrent} at a time, into {experiment}")
    sampler = Sampler(experiment, marks, args.concurrent, args.trials)
    sampler.start()
    code = command("search")([str(TINY), "--name", "scale", "--storage", str(storage),
                        "--set", f"search.num_samples={args.trials}", "--set", f"search.max_concurrent={args.concurrent}",
                        "--set", f"search.resources.cpu={cpus / args.concurrent:g}",
                        "--set", "training.epochs=1", "--set", "training.eval_every=0.5",
                        "--set", "search.asha.grace_period=0.5", "--set", "data.synthetic_size=48",
                        "--set", "data.val_size=8"])
    sampler.finish()
    report_s = timed_command("tune_llama.report", str(experiment))
    export_s = timed_command("tune_llama.export", str(experiment), "--by", "loss", "--out", str(storage / "export"))
    rows = sampler.rows
    at = {r["trials"]: r for r in rows}
    rss_ratio = at[str(args.trials)]["driver_rss_mb"] / at["50"]["driver_rss_mb"] if "50" in at else None
    worst_overhead = max((r["overhead_s"] for r in rows if r["overhead_s"] == r["overhead_s"]), default=None)
    if args.json:
        print(json.dumps({"rows": rows, "report_s": report_s, "export_s": export_s, "search_exit": code,
                          "rss_last_over_50": rss_ratio}))
        return 0
    print(f"{'trials':>6} {'wall s':>7} {'driver RSS MB':>13} {'object store MB':>15} {'overhead s/trial':>16} "
          f"{'optuna.db KB':>12}")
    for r in rows:
        store = "-" if r["object_store_mb"] is None else f"{r['object_store_mb']:.1f}"
        print(f"{r['trials']:>6} {r['wall_s']:>7.0f} {r['driver_rss_mb']:>13.0f} {store:>15} "
              f"{r['overhead_s']:>16.2f} {r['optuna_db_kb']:>12.0f}")
    print(f"search exit code {code}; report {report_s:.1f} s (goal <= 15), export {export_s:.1f} s")
    if rss_ratio is not None:
        print(f"driver RSS at {args.trials} / at 50: {rss_ratio:.2f} (goal <= 1.3)")
    if worst_overhead is not None:
        print(f"largest overhead per trial: {worst_overhead:.2f} s (goal <= 1)")
    return 0


# ---------------------------------------------------------------- --memory: the trial processes

DEMO = common.REPO / "search_spaces" / "demo.yaml"
MEMORY_SPEC = ["data.batch_size=4", "training.eval_every=0.5", "search.max_concurrent=1", "wandb.mode=disabled"]
"""demo.yaml (the embedded SmolLM2-135M with LoRA, real GSM8K problems), two reports a trial, one trial at a time:
every trial after the first runs in the process of one that ended (``reuse_actors``), the case that grew."""
SMOKE_SPEC = ["training.epochs=1", "search.asha.grace_period=0.5", "data.synthetic_size=48", "data.val_size=8"]
"""With ``--smoke-test``, on tiny.yaml: seconds a trial."""


def session_rss(session: int) -> dict[int, int]:
    """pid -> resident set (kB) of the Ray worker processes (``ray::...``) of one process session."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            pid = int(status.parent.name)
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) != session or not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                continue
            found[pid] = int(re.search(r"VmRSS:\s+(\d+) kB", status.read_text())[1])
        except (OSError, ValueError, TypeError, IndexError):  # gone meanwhile, or a kernel thread
            continue
    return found


def sampled_search(name: str, storage: Path, spec: Path, overrides: list[str]) -> tuple[list[list[dict]], list]:
    """Run ``tune-llama search`` in its own session, reading the RSS of its Ray workers twice a second:
    (each trial's result rows, in the order the trials started; the samples (time, pid, kB))."""
    argv = [sys.executable, "-m", "tune_llama.search", str(spec), "--name", name, "--storage", str(storage)]
    for override in overrides:
        argv += ["--set", override]
    log = storage / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "RAY_memory_monitor_refresh_ms": "0"})
        samples = []
        while proc.poll() is None:
            now = time.time()
            samples += [(now, pid, kb) for pid, kb in session_rss(proc.pid).items()]
            time.sleep(0.5)
    if proc.returncode != 0:
        common.say(f"search {name} exit {proc.returncode}: {log.read_text()[-2000:]}")
    from tune_llama.results import read_result_rows
    trials = [read_result_rows(f) for f in sorted((storage / name).glob("*/result.json"))]
    trials = sorted((rows for rows in trials if rows), key=lambda rows: rows[0]["timestamp"] - rows[0]["time_total_s"])
    return trials, samples


def trial_memory(rows: list[dict], samples: list) -> dict:
    """A trial's reported ``peak_memory_gb`` and the largest RSS its process(es) had while it ran."""
    pids = {r["pid"] for r in rows}
    start, end = rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"] + 1.0
    rss = [kb for t, pid, kb in samples if pid in pids and start <= t <= end]
    return {"trial": rows[0]["trial_id"], "pids": sorted(pids), "epochs": rows[-1]["epoch"],
            "reported_peak_gb": max(r["peak_memory_gb"] for r in rows), "process_rss_gb": max(rss, default=0) / 2**20}


def memory_main(args, p: argparse.ArgumentParser) -> int:
    trials = 3 if args.smoke_test and args.trials == p.get_default("trials") else (
        12 if args.trials == p.get_default("trials") else args.trials)
    storage = (args.storage or Path(tempfile.mkdtemp(prefix="trial-memory-"))).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    spec = TINY if args.smoke_test else DEMO
    base = [*MEMORY_SPEC, *(SMOKE_SPEC if args.smoke_test else [])]
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    common.say(f"machine: cpu x{os.cpu_count()}, {memory:.0f} GB, load average {os.getloadavg()[0]:.1f}; {spec.name}, "
               f"{trials} trials per scheduler, into {storage}")
    fresh, samples = sampled_search("fresh", storage, spec, [*base, "search.num_samples=1"])
    fresh_gb = max((kb for _, _, kb in samples), default=0) / 2**20
    fresh_reported = trial_memory(fresh[0], samples)["reported_peak_gb"] if fresh else None
    result: dict = {"fresh_process_gb": fresh_gb, "fresh_reported_gb": fresh_reported, "schedulers": {}}
    for scheduler in ("halving", "asha"):
        runs, samples = sampled_search(scheduler, storage, spec, [*base, f"search.num_samples={trials}",
                                                                   f"search.scheduler={scheduler}"])
        result["schedulers"][scheduler] = {
            "trials": [trial_memory(rows, samples) for rows in runs],
            "largest_process_gb": max((kb for _, _, kb in samples), default=0) / 2**20}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'scheduler':<9} {'trial':<9} {'process':>8} {'epochs':>6} {'reported peak GB':>16} {'process RSS GB':>14}")
    for scheduler, found in result["schedulers"].items():
        for t in found["trials"]:
            print(f"{scheduler:<9} {t['trial']:<9} {','.join(map(str, t['pids'])):>8} {t['epochs']:>6.2f} "
                  f"{t['reported_peak_gb']:>16.2f} {t['process_rss_gb']:>14.2f}")
    print(f"fresh process, one trial: RSS {fresh_gb:.2f} GB (it reported {result['fresh_reported_gb'] or 0:.2f})")
    for scheduler, found in result["schedulers"].items():
        print(f"{scheduler}: largest trial-process RSS {found['largest_process_gb']:.2f} GB = "
              f"{found['largest_process_gb'] / max(fresh_gb, 1e-9):.2f} x the fresh process (goal <= 1.25)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
