"""The search's Optuna searcher, made safe for resuming after a hard kill and after a rebuild of its study
(``tune_llama.study``). The search's Tune callbacks are ``tune_llama.callbacks``."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from ray.tune.search.optuna import OptunaSearch

from tune_llama.ray_private import (attach_optuna_search, detached_optuna_search_state, optuna_search_study,
                                    optuna_search_trials, point_optuna_search_at, saved_optuna_search_state)
from tune_llama.results import RUNG_STOPPED, ended_state
from tune_llama.study import REBUILT, storage_url, trials_by_ray_id


ENQUEUED = "fixed_params"
"""Where Optuna keeps the params of a trial it took from its queue (``Study.enqueue_trial``)."""
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

    A trial a scheduler stopped short of ``full_length`` (``training.epochs``) is told to Optuna as pruned,
    with its reports as intermediate values: TPE then ranks it below every trial that trained to full length
    (and pruned ones among themselves by how far they got), as successive halving ranked it. Told as complete
    with a loss from a quarter of an epoch, a good config cut early looked worse than a poor one that went on,
    and TPE moved its proposals towards what looks good early.
    """

    def __init__(self, *args, search_dir: Path | str, full_length: float | None = None, **kwargs):
        super().__init__(*args, storage=open_storage(search_dir), **kwargs)
        self.search_dir = str(search_dir)
        self.full_length = full_length

    # ------------------------------------------------------------ the study of the folder being searched
    # The study lives in the search folder's optuna.db, and the folder can move (a copy, a move) between a stop
    # and a resume. So no pickle of the searcher holds a storage or a path to a database: Tune's tuner.pkl and
    # its searcher state (``save``) keep the study's trials as row ids, and the searcher opens the optuna.db of
    # ``search_dir`` (the folder the driver resumes: ``tuner.restored_tuner`` builds it there) when Tune sets
    # it up or restores it.

    def __getstate__(self) -> dict:
        return detached_optuna_search_state(self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._storage, self._ot_study, self._ot_trials = None, None, {}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(detached_optuna_search_state(self), out)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if self._storage is None:
            attach_optuna_search(self, open_storage(self.search_dir), self._study_name)
        return super().set_search_properties(metric, mode, config, **spec)

    def restore(self, checkpoint_path: str) -> None:
        """The sampler and the trials Tune saved, in the study of this searcher's folder (not the one saved)."""
        folder, name = self.search_dir, self._study_name
        self.__dict__.update(saved_optuna_search_state(Path(checkpoint_path).read_bytes()))
        self.search_dir = folder
        attach_optuna_search(self, open_storage(folder), name)
        self.follow_rebuilt_study()
        self.fail_orphans()

    def fail_orphans(self) -> None:
        """Tell as failed the trials the study holds as running that are none of Tune's restored trials.

        Optuna writes a trial the moment the searcher asks for it; Tune saves its own state (trials and this
        searcher) every few seconds. A driver killed in between leaves a running trial that no resume will
        ever run or tell (seen: a trial without params, asked as the kill landed); it would stay running in
        the study for good, and TPE's ``constant_liar`` would count it as a running trial forever.
        """
        study, asked = optuna_search_trials(self)
        if study is None:
            return
        known = {trial._trial_id for trial in asked.values()}  # optuna.Trial's storage row id (no public getter)
        for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
                if frozen.system_attrs.get(ENQUEUED):  # a first config (the spec's, a warm start's): ask it again
                    study.enqueue_trial(frozen.system_attrs[ENQUEUED], skip_if_exists=False)

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
                                 trial_id: {key: result.get(key) for key in
                                            (self.metric, "training_iteration", "epoch", "status")}}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # A trial stopped while paused at a rung (the halving scheduler) comes with no result: it ended on its
        # last report, as a trial ASHA stops does.
        last = getattr(self, "last_reports", {}).pop(trial_id, None)
        if result is None and not error:
            result = last
        # Tune hands the last report only to on_trial_complete; record it as an intermediate value too, so
        # the study (and optuna-dashboard) holds every report and shows exactly where a scheduler cut a trial.
        if result and result.get(self.metric) is not None and result.get("training_iteration") is not None:
            self.on_trial_result(trial_id, result)  # usually sent already: the repeat is dropped quietly
        full_length = getattr(self, "full_length", None)  # None in a searcher pickled by an older version
        if result and not error and full_length and ended_state(result, full_length) == RUNG_STOPPED:
            result = None  # OptunaSearch tells a trial without a value as pruned, at its last reported step
        try:
            super().on_trial_complete(trial_id, result, error)
        except UpdateFinishedTrialError:
            pass  # Ray 2.60 logs and swallows it itself; kept in case a later Ray lets it through

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


def open_storage(search_dir: Path | str) -> optuna.storages.RDBStorage:
    """The Optuna storage of the search in ``search_dir``: its ``optuna.db``."""
    return optuna.storages.RDBStorage(storage_url(Path(search_dir)))
