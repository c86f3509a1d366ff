"""A private, real Slurm for the tests: munged, slurmctld and one slurmd per node, all on loopback.

Everything lives under one folder (config, state, spool, logs, the munge key and
socket); the machine's own Slurm and munge configuration are never touched.
Each node is a separate `slurmd -N NAME` at its own loopback address
(127.0.0.1, 127.0.0.2, ...), so one machine is a two-node cluster to `sbatch -N2`,
and a Ray node started on each gets its own IP. The nodes may claim a GPU each:
a GRES backed by /dev/null, so Slurm's GPU bookkeeping (CUDA_VISIBLE_DEVICES,
SLURM_GPUS_ON_NODE) is real although the machine has no GPU.

Needs root (the daemons run as root, as on the CI machines) and Debian's
slurm-wlm and munge, which `tests/integration/system_packages.sh` (run by `make test`) installs when missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from conftest import wait_until

DEBIAN_PACKAGES = ["slurm-wlm", "munge", "shellcheck"]
PROGRAMS = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge",
            "shellcheck": "shellcheck"}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNFINISHED = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")


def which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_packages() -> None:
    """Fail naming what is missing: ``tests/integration/system_packages.sh`` (one policy for every system package the
    tests use) installs it; ``make test`` runs that first."""
    missing = sorted({package for program, package in PROGRAMS.items() if which(program) is None})
    if missing:
        raise RuntimeError(f"Slurm tests need {' '.join(missing)}: run tests/integration/system_packages.sh (as root)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Job:
    id: str
    state: str
    exit_code: str
    output: str


class SlurmCluster:
    """Start with `start()`, always `stop()` (it also ends every process the jobs left)."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int | None = None, gpus: int = 1):
        self.root = root
        self.names = [f"tl{i + 1}" for i in range(nodes)]
        self.cpus = cpus or os.cpu_count() or 1
        self.gpus = gpus
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)
        self.procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------ setup

    def write_config(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        node_lines, gres_lines = [], []
        for index, name in enumerate(self.names):
            gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
            node_lines.append(f"NodeName={name} NodeAddr=127.0.0.{index + 1} NodeHostname={name} "
                              f"CPUs={self.cpus} Port={free_port()}{gres} State=UNKNOWN")
            gres_lines += [f"NodeName={name} Name=gpu File=/dev/null"] * self.gpus
        (root / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        self.conf.write_text(f"""\
ClusterName=tunellama
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=30
InactiveLimit=0
{chr(10).join(node_lines)}
PartitionName=debug Nodes={",".join(self.names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def spawn(self, command: list[str], log: str) -> None:
        out = open(self.root / "log" / log, "ab")
        self.procs.append(subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        munge = self.root / "munge"
        self.spawn([which("munged"), "-F", "-f", f"--socket={munge}/socket", f"--key-file={munge}/munge.key",
                    f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/seed", f"--log-file={munge}/munged.log"],
                   "munged.out")
        self.wait_for(lambda: (munge / "socket").exists(), timeout, "munged's socket")
        self.spawn([which("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld.out")
        for name in self.names:
            (self.root / "spool" / name).mkdir(exist_ok=True)
            self.spawn([which("slurmd"), "-D", "-f", str(self.conf), "-N", name], f"slurmd.{name}.out")
        self.wait_for(self.all_idle, timeout, "the nodes to become idle")

    def all_idle(self) -> bool:
        done = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return sorted(states) == sorted(self.names) and all(state == "idle" for state in states.values())

    def wait_for(self, ready, timeout: float, what: str) -> None:
        """Until ``ready()``; a daemon that exits meanwhile fails at once, with the logs."""
        def ready_while_daemons_run():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
            return ready()
        wait_until(ready_while_daemons_run, what=what, timeout=timeout, interval=0.5, detail=self.logs)

    def logs(self) -> str:
        tails = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-8:]
            tails.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(tails)

    # ------------------------------------------------------------ jobs

    def run(self, command: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, timeout=kwargs.pop("timeout", 60), **kwargs)

    def submit(self, script: Path, args: list[str], sbatch: list[str], env: dict[str, str], cwd: Path) -> str:
        output = self.root / "log" / "job-%j.out"
        done = self.run(["sbatch", "--parsable", f"--output={output}", *sbatch, str(script), *args],
                        env={**self.env, **env}, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def job_fields(self, job_id: str) -> dict[str, str]:
        done = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        return dict(field.split("=", 1) for field in done.stdout.split() if "=" in field)

    def wait_job(self, job_id: str, timeout: float) -> Job:
        def ended():
            fields = self.job_fields(job_id)
            return fields if fields.get("JobState") not in (None, *UNFINISHED) else None
        try:
            fields = wait_until(ended, what=f"job {job_id} to end", timeout=timeout, interval=1,
                                detail=lambda: f"still {self.job_fields(job_id).get('JobState')}:\n"
                                               f"{self.job_output(job_id)[-4000:]}")
        except AssertionError:
            self.run(["scancel", job_id], check=False)
            raise
        return Job(job_id, fields["JobState"], fields.get("ExitCode", ""), self.job_output(job_id))

    def job_output(self, job_id: str) -> str:
        path = self.root / "log" / f"job-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, then kill whatever still carries this cluster's config."""
        if self.conf.exists():
            queued = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if queued:
                self.run(["scancel", *queued], check=False)
                try:
                    wait_until(lambda: not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split(),
                               what="the cancelled jobs to leave the queue", timeout=30, interval=1)
                except AssertionError:  # teardown goes on regardless: the daemons are stopped next
                    pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Job steps (slurmstepd) and what the jobs started (Ray) outlive the daemons; they all have
        # this cluster's SLURM_CONF in their environment.
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_pids(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids
