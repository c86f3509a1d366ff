"""The search's Tune callbacks: a backup of Tune's state, checkpoints a killed search's state still lists,
freeing a multi-worker trial's workers, stopping a search whose trials keep failing the same way, and Tune's
result loggers made to keep the driver's copy of a trial's files.

They rest on Ray internals that ``tune_llama.ray_private`` reads and names (checked against the Ray it
pins); this module imports Ray, and only the search side imports it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.stopper import Stopper

from tune_llama.ray_private import back_up_state, drop_staged_copies, forget_lost_checkpoints, release_placement_group
from tune_llama.results import SAME_ERROR_FILE
from tune_llama.spec import Spec


class StateBackup(Callback):
    """A parsed copy of each new version of Tune's experiment state (``ray_private.back_up_state``), so a
    state file cut short by a full disk does not make ``--resume`` start the search over."""

    def __init__(self, search_dir: str, every_s: float = 1.0):
        self.search_dir, self.every_s, self.last, self.saved_mtime = search_dir, every_s, 0.0, 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every_s:  # a stat per second; a copy only when Tune wrote one
            self.last = time.monotonic()
            self.saved_mtime = back_up_state(Path(self.search_dir), self.saved_mtime)

    def on_experiment_end(self, trials, **info):
        self.saved_mtime = back_up_state(Path(self.search_dir), self.saved_mtime)


class ForgetLostCheckpoints(Callback):
    """At a resumed search's first step, before Tune saves or syncs anything: its trials forget the checkpoints
    Tune deleted after its last saved state (``ray_private.forget_lost_checkpoints``), before any trial
    registers a new one; and Tune's staging folder drops the copies of the search folder's own files that a
    resume stages (``ray_private.drop_staged_copies``), which Tune would upload over the live ones (the halving
    scheduler's records) every few seconds."""

    def __init__(self):
        self.checked = False

    def on_step_begin(self, iteration, trials, **info):
        if not self.checked:  # restored trials are all there at the first step; new trials have lost nothing
            self.checked = True
            for trial in trials:
                forget_lost_checkpoints(trial)
            if trials:  # a restored run: its staging folder is its first trial's (Tune shares it)
                drop_staged_copies(Path(trials[0].local_experiment_path))


class ReleaseWorkers(Callback):
    """A multi-worker trial that ended, or waits paused at a rung, frees its workers' placement group
    (``ray_private``): Ray Train V2 inside Tune can leave it allocated when a scheduler stops or pauses the
    trial (ray-project/ray#54305). A paused trial that goes on starts a new group from its checkpoint."""

    def __init__(self):
        self.released_while_paused: set[str] = set()

    def on_step_end(self, iteration, trials, **info):
        for trial in trials:
            if trial.status != Trial.PAUSED:
                self.released_while_paused.discard(trial.trial_id)
            elif trial.trial_id not in self.released_while_paused:
                release_placement_group(trial.trial_id)
                self.released_while_paused.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        release_placement_group(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        release_placement_group(trial.trial_id)


def worker_callbacks(spec: Spec) -> list:
    """The Tune callbacks a multi-worker search needs (none for one-process trials)."""
    return [ReleaseWorkers()] if spec.search.resources.workers > 1 else []


class SameErrorStop(Callback):
    """Stops the search once ``limit`` trials in a row ended in the same error (last line of ``error.txt``:
    type and message), and writes the line that says so into ``SAME_ERROR_FILE``.

    A value that breaks every trial (a bad model file, a data column gone) otherwise fails each of
    ``num_samples`` trials after minutes of set-up. A trial that ends normally breaks the run of errors.
    ``stopper`` is the Tune ``Stopper`` half: Tune asks it whether to stop everything.
    """

    def __init__(self, search_dir: str, limit: int):
        self.search_dir, self.limit = search_dir, limit
        self.error: str | None = None
        self.files: list[str] = []
        self.tripped = False
        self.stopper = SameErrorStopper(self)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.error, self.files = None, []

    def on_trial_error(self, iteration, trials, trial, **info):
        error_file = trial.error_file  # the driver's staging copy, until Tune syncs it into the trial folder
        try:
            lines = Path(error_file).read_text(errors="replace").strip().splitlines() if error_file else []
        except OSError:
            lines = []
        error = lines[-1].strip() if lines else "error (no error file)"
        if error != self.error:
            self.error, self.files = error, []
        self.files.append(str(Path(trial.path) / Path(error_file).name) if error_file else trial.path)
        if self.limit and len(self.files) >= self.limit and not self.tripped:
            self.tripped = True
            line = (f"{len(self.files)} trials in a row failed the same way, so the search stopped: {error} "
                    f"(full errors: {', '.join(self.files)})")
            (Path(self.search_dir) / SAME_ERROR_FILE).write_text(line + "\n")


class SameErrorStopper(Stopper):
    def __init__(self, errors: SameErrorStop):
        self.errors = errors

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.errors.tripped


# ---------------------------------------------------------------- result files of a trial that starts again

# Private: ray.tune.logger.LoggerCallback._restore_from_remote(file_name, trial), checked on 2.60.0 (with the rest
# in tune_llama.ray_private, which must import without Ray: this override cannot live there). When a trial with a
# checkpoint starts (a resume, and also a trial paused at a rung going on in the same search), Tune's JSON and CSV
# loggers copy the trial's result.json / progress.csv from the search storage over the driver's own copy.
# Storage's copy lags the driver's by up to one experiment sync (about 10 s), so the rows written since were lost
# (a halving search showed reports 1, 3, 4). The driver's copy, where it exists, is the newer one; a resumed
# search (a new driver, no copy) still restores from storage.

class KeepDriverCopy:
    """What Tune's result loggers below share: a trial's file that this driver wrote is not restored."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if Path(trial.local_path, file_name).is_file():
            return  # this driver wrote it: newer than storage's copy
        super()._restore_from_remote(file_name, trial)


class DriverCopyJsonLogger(KeepDriverCopy, JsonLoggerCallback):
    """Tune's ``result.json`` logger, keeping the driver's copy of a trial's file when it has one."""


class DriverCopyCsvLogger(KeepDriverCopy, CSVLoggerCallback):
    """Tune's ``progress.csv`` logger, keeping the driver's copy of a trial's file when it has one."""


def result_loggers() -> list:
    """Tune's JSON and CSV result loggers, keeping the driver's copy of a trial's file when it has one."""
    return [DriverCopyJsonLogger(), DriverCopyCsvLogger()]
