"""Read a search folder (``results/NAME``) straight from its files, while it runs or after it stopped.

Ray Tune's own readers need a consistent experiment state; a search that is
still running, was killed or is being resumed may not have one. So the trials
come from their folders (``params.json``, ``result.json``, ``checkpoint_*``),
and Ray's newest ``experiment_state-*.json`` only adds what the files cannot
say: whether a trial errored, is still pending, or was ended by the scheduler.
No Ray import: export and report also run where Ray is not installed.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tune_llama.errors import UserError
from tune_llama.search import SPEC_FILE  # tune_llama.search imports Ray only when a search starts
from tune_llama.spec import Spec, SpecError, apply_params, spec_from_dict

FINISHED, ASHA_STOPPED, EARLY_STOPPED, DIVERGED = "finished", "stopped by ASHA", "early stopped", "diverged"
ERRORED, RUNNING, PENDING, INTERRUPTED = "errored", "running", "pending", "interrupted"
NO_RESULT = "ended without a result"


@dataclass
class Trial:
    trial_id: str
    path: Optional[Path]
    """The trial's folder; None while Ray has not started it."""
    params: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    """One row per reported epoch (the loop's metrics plus Ray's fields), by epoch."""
    ray_status: Optional[str] = None
    """TERMINATED, ERROR, RUNNING, PENDING or PAUSED from Ray's state; None when it has none."""
    error: Optional[str] = None
    """The first line of the trial's error file, when it errored."""

    def best_epoch(self, metric: str, mode: str) -> Optional[dict[str, Any]]:
        """The epoch row with the best finite ``metric``, or None."""
        return best_row(self.epochs, metric, mode)

    def checkpoints(self) -> dict[str, Path]:
        """Checkpoint folders on disk, by name (``checkpoint_000003``)."""
        if self.path is None:
            return {}
        return {p.name: p for p in sorted(self.path.glob("checkpoint_*")) if (p / "trainable.safetensors").is_file()}

    def best_checkpoint(self, metric: str, mode: str) -> Optional[tuple[Path, dict[str, Any]]]:
        """(folder, epoch row) of the best checkpoint that still exists (Ray deletes the worse ones)."""
        on_disk = self.checkpoints()
        rows = [r for r in self.epochs if r.get("checkpoint_dir_name") in on_disk]
        row = best_row(rows, metric, mode)
        return (on_disk[row["checkpoint_dir_name"]], row) if row else None

    @property
    def time_s(self) -> float:
        """Wall time the trial has used (Ray's ``time_total_s`` of its last report)."""
        return float(self.epochs[-1].get("time_total_s", 0.0)) if self.epochs else 0.0

    def status(self, max_epochs: int) -> str:
        """finished / stopped by ASHA / early stopped / diverged / errored / running / pending / interrupted.

        Ray's state says errored, pending or ended; the epochs say how far the trial got and how the loop
        ended it; a trial Ray ended before ``training.epochs`` without the loop stopping it was ASHA's call.
        """
        last = self.epochs[-1] if self.epochs else {}
        loop_status = last.get("status")
        if self.ray_status == "ERROR":
            return ERRORED
        if not self.epochs:
            return {"RUNNING": RUNNING, "TERMINATED": NO_RESULT}.get(self.ray_status or "", PENDING)
        if loop_status == "diverged":
            return DIVERGED
        if loop_status == "early_stopped":
            return EARLY_STOPPED
        if len(self.epochs) >= max_epochs or loop_status == "completed":
            return FINISHED
        if self.ray_status == "TERMINATED" or (self.ray_status is None and last.get("done")):
            return ASHA_STOPPED  # Tune ended it before training.epochs and the loop did not
        if self.ray_status in ("PENDING", "PAUSED"):
            return PENDING
        return RUNNING if worker_alive(last) else INTERRUPTED


@dataclass
class Search:
    path: Path
    spec: Spec
    trials: list[Trial]

    @property
    def name(self) -> str:
        return self.path.name

    def trial_spec(self, trial: Trial) -> Spec:
        return apply_params(self.spec, trial.params)

    def best(self) -> Optional[tuple[Trial, dict[str, Any]]]:
        """The trial with the best metric at any epoch (not only its last), and that epoch's row."""
        metric, mode = self.spec.search.metric, self.spec.search.mode
        scored = [(t, t.best_epoch(metric, mode)) for t in self.trials]
        scored = [(t, row) for t, row in scored if row is not None]
        if not scored:
            return None
        return sorted(scored, key=lambda pair: sort_key(pair[1][metric], mode))[0]


# ---------------------------------------------------------------- reading

def load_search(path: Path | str) -> Search:
    """The search in ``path``, or a UserError saying why it is not one."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"search folder not found: {path}")
    spec_file = path / SPEC_FILE
    if not spec_file.is_file():
        raise UserError(f"{path} is not a tune-llama search folder (no {SPEC_FILE}; "
                        "create one with python -m tune_llama.search SPEC --name NAME)")
    try:
        spec = spec_from_dict(json.loads(spec_file.read_text()))
    except (ValueError, SpecError) as err:
        raise UserError(f"{spec_file}: not a valid search spec ({str(err).splitlines()[0]})") from None
    trials = {t.trial_id: t for t in (read_trial_folder(p) for p in trial_folders(path))}
    for state in ray_trial_states(path):
        trial = trials.get(state["trial_id"])
        if trial is None:
            folder = path / state["relative_logdir"] if state.get("relative_logdir") else None
            trial = trials.setdefault(state["trial_id"], Trial(state["trial_id"], folder if folder and folder.is_dir()
                                                               else None, state.get("config") or {}))
        trial.ray_status = state.get("status")
        trial.error = state.get("error")
        trial.params = trial.params or state.get("config") or {}
    return Search(path, spec, sorted(trials.values(), key=trial_order))


def trial_folders(path: Path) -> list[Path]:
    """Trial folders: Ray writes ``params.json`` into each as the trial starts."""
    return sorted(p.parent for p in path.glob("*/params.json"))


def read_trial_folder(folder: Path) -> Trial:
    params = read_json(folder / "params.json") or {}
    rows = read_result_rows(folder / "result.json")
    trial_id = next((r["trial_id"] for r in rows if r.get("trial_id")), None) or trial_id_from_name(folder.name)
    return Trial(trial_id, folder, params, rows)


def read_result_rows(path: Path) -> list[dict[str, Any]]:
    """Per-epoch rows of Ray's ``result.json``; a half-written last line (a live search) is skipped.

    A resumed trial may report an epoch again: the later row wins.
    """
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def ray_trial_states(path: Path) -> list[dict[str, Any]]:
    """Per trial: id, Ray status, config, folder and error line, from the newest experiment state."""
    files = sorted(path.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    state = read_json(files[-1]) if files else None
    out = []
    for entry in (state or {}).get("trial_data", []):
        try:
            trial = json.loads(entry[0])
            runtime = json.loads(entry[1]) if len(entry) > 1 else {}
        except (ValueError, TypeError, IndexError):
            continue
        error = None
        if runtime.get("error_filename"):
            error_file = path / trial.get("relative_logdir", "") / runtime["error_filename"]
            lines = error_file.read_text(errors="replace").strip().splitlines() if error_file.is_file() else []
            error = lines[-1] if lines else "error (no error file)"
        out.append({"trial_id": trial.get("trial_id"), "status": trial.get("status"), "config": trial.get("config"),
                    "relative_logdir": trial.get("relative_logdir"), "error": error})
    return [s for s in out if s["trial_id"]]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def trial_id_from_name(name: str) -> str:
    # Ray names trial folders TRAINABLE_TRIALID_N_params_DATE, e.g. train_trial_51d262fe_1_...
    parts = name.split("_")
    return parts[2] if len(parts) > 2 and parts[:2] == ["train", "trial"] else name


def trial_order(trial: Trial) -> tuple:
    # Ray's folder names carry the trial's sequence number after the id; pending trials go last.
    if trial.path is None:
        return (1, 0, trial.trial_id)
    parts = trial.path.name.split("_")
    number = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
    return (0, number, trial.trial_id)


# ---------------------------------------------------------------- helpers

def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> Optional[dict[str, Any]]:
    finite = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    return min(finite, key=lambda r: sort_key(r[metric], mode)) if finite else None


def sort_key(value: float, mode: str) -> float:
    return value if mode == "min" else -value


def worker_alive(row: dict[str, Any]) -> bool:
    """Whether the process that last reported for a trial still runs (unknowable on another host: yes)."""
    pid, host = row.get("pid"), row.get("hostname")
    if not isinstance(pid, int) or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
