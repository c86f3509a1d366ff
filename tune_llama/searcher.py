"""The search's Optuna searcher, made safe for resuming after a hard kill and after a rebuild of its study
(``tune_llama.study``). The search's Tune callbacks are ``tune_llama.callbacks``."""

from __future__ import annotations

import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch

from tune_llama.ray_private import optuna_search_study, point_optuna_search_at
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
