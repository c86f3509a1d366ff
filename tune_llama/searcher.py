"""The Tune-side pieces of a search: the Optuna searcher, made safe for resuming after a hard kill, and the
callbacks (a backup of Tune's state; freeing a multi-worker trial's workers)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from tune_llama.ray_private import (back_up_state, forget_lost_checkpoints, optuna_search_study,
                                    point_optuna_search_at, release_placement_group)
from tune_llama.results import SAME_ERROR_FILE
from tune_llama.spec import Spec
from tune_llama.study import REBUILT, trials_by_ray_id


REPEATED_STEP = "The reported value is ignored because this `step"
"""The start of Optuna's warning for a second report at a step (``optuna.trial.Trial.report``)."""


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch whose study lives in SQLite and survives a resume.

    The SQLite study is written as results arrive, but Tune's experiment
    snapshot can be older: on resume Tune may rerun the last epochs of a trial
    that Optuna already closed. Optuna rejects updates to a finished trial
    (``UpdateFinishedTrialError``); its value is already recorded, so those late
    updates are dropped. Only the public Searcher hooks are overridden: each late
    update is refused by Optuna and dropped here, nothing in Ray's state is changed.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A resumed trial repeats the reports it made after its last checkpoint, and the study (kept or rebuilt
        # from the trial folders) already holds them: Optuna keeps the first and warns, which says nothing to
        # the user, as the repeat retrains from the same seed and checkpoint.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=REPEATED_STEP, category=UserWarning)
            try:
                super().on_trial_result(trial_id, result)
            except UpdateFinishedTrialError:
                pass  # a replayed epoch of a trial Optuna already closed
        if result.get(self.metric) is not None:
            self.last_reports = {**getattr(self, "last_reports", {}),
                                 trial_id: {self.metric: result[self.metric], "training_iteration":
                                            result.get("training_iteration")}}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # A trial stopped while paused at a rung (the halving scheduler) comes with no result: it ended on its
        # last report, as a trial ASHA stops does, not pruned by Optuna (PED-ANOVA importance counts it then).
        last = getattr(self, "last_reports", {}).pop(trial_id, None)
        if result is None and not error:
            result = last
        # Tune hands the last report only to on_trial_complete; record it as an intermediate value too, so
        # the study (and optuna-dashboard) holds every report and shows exactly where a scheduler cut a trial.
        if result and result.get(self.metric) is not None and result.get("training_iteration") is not None:
            self.on_trial_result(trial_id, result)  # usually sent already: the repeat is dropped quietly
        try:
            super().on_trial_complete(trial_id, result, error)
        except UpdateFinishedTrialError:
            pass  # Ray 2.60 logs and swallows it itself; kept in case a later Ray lets it through


    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.follow_rebuilt_study()

    def follow_rebuilt_study(self) -> None:
        """After ``optuna.db`` was rebuilt from the trial folders (``tune_llama.study``), the pickled searcher
        still holds the old database's trials: ask and tell the new study, each Ray trial its new row.

        The rebuild's mark is remembered, so a later resume of the same study keeps the trials asked since.
        """
        import optuna
        storage, name, sampler = optuna_search_study(self)
        if storage is None:
            return
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        mark = study.user_attrs.get(REBUILT)
        if not mark or mark == getattr(self, "followed_rebuild", None):
            return
        rows = trials_by_ray_id(study)
        # FrozenTrial._trial_id: the storage row id, which optuna.trial.Trial takes (Optuna has no public getter).
        trials = {ray_id: optuna.trial.Trial(study, frozen._trial_id) for ray_id, frozen in rows.items()}
        point_optuna_search_at(self, study, trials, {ray_id for ray_id, t in rows.items() if t.state.is_finished()})
        self.followed_rebuild = mark


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
    """A resumed search's trials forget the checkpoints Tune deleted after its last saved state
    (``ray_private.forget_lost_checkpoints``), before any trial registers a new one."""

    def __init__(self):
        self.checked = False

    def on_step_begin(self, iteration, trials, **info):
        if not self.checked:  # restored trials are all there at the first step; new trials have lost nothing
            self.checked = True
            for trial in trials:
                forget_lost_checkpoints(trial)


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
