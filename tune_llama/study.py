"""The search's Optuna study (``optuna.db``), and its rebuild from the trials' own folders.

The study is a cache of what the trial folders already hold: each trial's
``params.json`` and the reports in its ``result.json``. When ``optuna.db`` is
damaged (a disk error, a copy cut short) or gone, ``--resume`` moves it aside
to ``optuna.db.damaged`` and fills a new study from the folders, so the
sampler keeps what the search learnt and nothing is lost.

Each rebuilt trial carries its Ray trial id (``RAY_TRIAL_ID``), and the study
says it was rebuilt (``REBUILT``): Ray's pickled searcher state still points
at the old study's rows, and ``searcher.ResumableOptunaSearch`` uses both to
point the trials Ray resumes at their new rows.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from tune_llama.results import NORMAL_ENDS, OPTUNA_DB, RUNG_STOPPED, Search

RAY_TRIAL_ID = "ray_trial_id"
REBUILT = "rebuilt_from_trial_folders"
DAMAGED_SUFFIX = ".damaged"
# SQLite's side files: a leftover journal would be replayed into the new database.
SIDE_FILES = ("-journal", "-wal", "-shm")


def storage_url(search_dir: Path) -> str:
    return f"sqlite:///{search_dir / OPTUNA_DB}"


def study_readable(search_dir: Path) -> bool:
    """``optuna.db`` is there, passes SQLite's own check, and holds this search's study."""
    import optuna
    db = search_dir / OPTUNA_DB
    if not db.is_file():
        return False
    try:
        # Read-only, so a damaged file is not touched (SQLAlchemy would try to create tables in it).
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                return False
        connection.close()
        with opened_storage(search_dir) as storage:
            name = named_study(optuna.get_all_study_names(storage), search_dir)
            optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        return True
    except Exception:  # sqlite3, SQLAlchemy and Optuna each have their own errors for a bad file
        return False


def study_name(search_dir: Path) -> str:
    """The name of the search's study in its ``optuna.db``: the folder's name at the search's first start, which
    a copied or moved folder keeps; the folder's own name for a new search (or a database without a study)."""
    import optuna
    if not (search_dir / OPTUNA_DB).is_file():
        return search_dir.name
    with opened_storage(search_dir) as storage:
        return named_study(optuna.get_all_study_names(storage), search_dir)


@contextlib.contextmanager
def opened_storage(search_dir: Path) -> Iterator[Any]:
    """The search's ``optuna.db`` as an Optuna storage, its connections closed after (a reader leaves no lock)."""
    import optuna
    storage = optuna.storages.RDBStorage(storage_url(search_dir))
    try:
        yield storage
    finally:
        storage.remove_session()
        storage.engine.dispose()


def named_study(names: list[str], search_dir: Path) -> str:
    """The folder's name if a study has it, else the one study there is (a copy's: named for the original)."""
    return names[0] if len(names) == 1 and search_dir.name not in names else search_dir.name


def move_aside(search_dir: Path) -> bool:
    """Move a damaged ``optuna.db`` (and its side files) to ``optuna.db.damaged``; whether there was one."""
    db = search_dir / OPTUNA_DB
    existed = db.exists()
    for suffix in ("", *SIDE_FILES):
        path = db.with_name(OPTUNA_DB + suffix)
        if path.exists():
            os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
    return existed


def rebuild_study(search: Search, distributions: dict[str, Any]) -> int:
    """A new ``optuna.db`` filled from the trial folders of ``search``; how many trials it restored.

    ``distributions``: the Optuna distributions Ray's OptunaSearch made of the search space (so a restored
    trial's params match what the sampler asks for). Trials that ended (ASHA stops included) come back
    complete with their best value, and every report as an intermediate value at its training iteration;
    unfinished and errored trials, which Ray's resume runs again, come back running.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    metric, mode = search.metric, search.mode
    study = optuna.create_study(storage=storage_url(search.path), study_name=search.name,
                                direction="minimize" if mode == "min" else "maximize")
    # A mark of this rebuild (the time it happened), which the searcher compares with the one it followed.
    study.set_user_attr(REBUILT, datetime.datetime.now().isoformat())
    restored = 0
    for trial in search.trials:
        if not set(distributions) <= set(trial.params):
            continue  # not a trial of this space (nothing to tell the sampler)
        intermediate = {}
        for i, row in enumerate(trial.rows):
            value = row.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                intermediate[int(row.get("training_iteration", i + 1))] = float(value)
        best = trial.best(metric, mode)
        if search.status(trial) == RUNG_STOPPED:  # as the searcher tells it (``searcher.ResumableOptunaSearch``)
            state, value = TrialState.PRUNED, None
        elif search.status(trial) in NORMAL_ENDS:
            state, value = (TrialState.COMPLETE, best[metric]) if best else (TrialState.FAIL, None)
        else:
            state, value = TrialState.RUNNING, None
        study.add_trial(create_trial(
            state=state, value=value, params={k: trial.params[k] for k in distributions},
            distributions=distributions, intermediate_values=intermediate,
            user_attrs={RAY_TRIAL_ID: trial.trial_id}))
        restored += 1
    return restored


def trials_by_ray_id(study) -> dict[str, Any]:
    """Ray trial id -> the study's frozen trial, for the trials that carry one."""
    return {t.user_attrs[RAY_TRIAL_ID]: t for t in study.get_trials(deepcopy=False) if RAY_TRIAL_ID in t.user_attrs}
