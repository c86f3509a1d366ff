"""Every use of Ray Tune internals, in one place, checked against ray 2.60.0.

Ray has no public reader for a search that is still running, was killed or is being resumed
(``ray.tune.ExperimentAnalysis`` wants a consistent state and Ray itself), so tune-llama reads two things Ray
does not promise to keep:

* ``experiment_state-*.json``: ``{"trial_data": [[trial_json, run_metadata_json], ...]}``, written by
  ``TuneController.save_to_dir`` (``CKPT_FILE_TMPL``); the trial JSON holds ``trial_id``, ``status``, ``config``,
  ``relative_logdir``, the run metadata JSON holds ``error_filename`` (``error.txt``) when the trial errored;
* trial folder names, ``Trial._generate_dirname``: ``TRAINABLE_TRIALID_N_params_DATE``, e.g.
  ``train_trial_51d262fe_3_lr=0.001_2025-01-01_00-00-00``, where N is the trial's sequence number in the search.

and, driving a search: ``search_gen_state-*.json`` (``total_samples``, raised by ``--more``; the storage of
the trials it has yet to create), ``tuner.pkl`` (the configs a restore runs with), a resume's staged copies
of the folder's files, ``TuneController.stop_trial`` and ``_mark_trial_to_checkpoint`` (the halving scheduler
stops paused trials), a trial's kept checkpoints (a resumed search forgets those a kill left listed but
deleted), OptunaSearch's study and trials; for bench/scale.py, the running Ray's session folder.
One more, a method to override, lives with the subclasses that override it, as it needs Ray imported:
``LoggerCallback._restore_from_remote`` (``tune_llama.callbacks.KeepDriverCopy``).

``tests/integration/test_ray_private_against_real_tune.py`` runs a real Tune experiment and fails, naming the
piece, when any of this changes; ``pyproject.toml`` pins ``ray`` to the minor versions it was checked on. No Ray
import at module level: export and report read searches where Ray is not installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from tune_llama.paths import read_json, replace_file
from tune_llama.pickles import OlderState, load_detached

CHECKED_RAY_VERSION = "2.60.0"
EXPERIMENT_STATE_GLOB = "experiment_state-*.json"
SEARCH_GENERATOR_STATE_GLOB, SEARCHER_STATE_GLOB = "search_gen_state-*.json", "searcher-state-*.pkl"
TUNER_STATE = "tuner.pkl"
TRAINABLE_NAME = "train_trial"  # tune_llama.trainable.train_trial: the first part of every trial folder name
# Trial ids are 8 hex digits when a search algorithm (OptunaSearch) creates the trials, ``24d0c_00000`` with
# Tune's default variant generator.
TRIAL_FOLDER = re.compile(rf"^{TRAINABLE_NAME}_(?P<trial_id>[0-9a-f]+(?:_[0-9]{{5}})?)_(?P<number>[0-9]+)_")


def read_trial_states(experiment: Path) -> list[dict[str, Any]]:
    """Per trial in Ray's newest experiment state: trial_id, status, config, relative_logdir, error, error_file.

    ``status`` is Ray's (TERMINATED, ERROR, RUNNING, PENDING, PAUSED); ``error`` is the last line of the
    trial's error file (the exception), ``error_file`` its absolute path; both None unless the trial errored.
    Entries that do not parse (a state being written) are skipped; no state file gives ``[]``.
    """
    experiment = Path(experiment)
    newest = newest_state(experiment)
    state = read_json(newest) if newest else None
    entries = state.get("trial_data", []) if isinstance(state, dict) else []
    out = []
    for entry in entries:
        try:
            trial = json.loads(entry[0])
            runtime = json.loads(entry[1]) if len(entry) > 1 else {}
        except (ValueError, TypeError, IndexError):
            continue
        if not isinstance(trial, dict) or not trial.get("trial_id"):
            continue
        error_file, error = _error(experiment, trial, runtime if isinstance(runtime, dict) else {})
        out.append({"trial_id": trial["trial_id"], "status": trial.get("status"), "config": trial.get("config"),
                    "relative_logdir": trial.get("relative_logdir"), "error": error, "error_file": error_file})
    return out


def trial_id_from_name(name: str) -> str:
    """The trial id in a trial folder name (``train_trial_51d262fe_1_...`` -> ``51d262fe``); else the name."""
    match = TRIAL_FOLDER.match(name)
    return match["trial_id"] if match else name


def trial_sequence_number(folder_name: str) -> int:
    """The trial's sequence number in its search, from its folder name (the part after the id); 0 if none."""
    match = TRIAL_FOLDER.match(folder_name)
    return int(match["number"]) if match else 0


def _error(experiment: Path, trial: dict, runtime: dict) -> tuple[Optional[str], Optional[str]]:
    """(absolute error file path or None if it is gone, its last line) of an errored trial; else (None, None)."""
    if not runtime.get("error_filename"):
        return None, None
    error_file = (experiment / (trial.get("relative_logdir") or "") / runtime["error_filename"]).resolve()
    try:
        lines = error_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None, "error (no error file)"
    return str(error_file), lines[-1] if lines else "error (no error file)"


# ---------------------------------------------------------------- a last good copy of the experiment state

GOOD_STATE = ".last-good-state"
"""Ray rewrites its state files (``experiment_state-*.json``, the search generator's ``search_gen_state-*.json``
and the searcher's ``searcher-state-*.pkl``) in place; a full disk can leave any of them cut short, and
``Tuner.restore`` then fails or silently starts the search over. A copy of each, taken only while it loads,
is kept in this folder and put back before a resume."""
STATE_GLOBS = (EXPERIMENT_STATE_GLOB, SEARCH_GENERATOR_STATE_GLOB, SEARCHER_STATE_GLOB)


def newest_state(experiment: Path, pattern: str = EXPERIMENT_STATE_GLOB) -> Optional[Path]:
    """The state file of the newest Tune session: Ray names them by the session's start time
    (``experiment_state-2026-11-28_18-18-47.json``) and picks the greatest name on restore, so do we. Not the
    newest mtime: at a search's end Ray copies every file again, an earlier session's too, in any order."""
    return max(Path(experiment).glob(pattern), key=lambda p: p.name, default=None)


def _loads(data: bytes) -> bool:
    """Whether a state file's bytes load (JSON, or the cloudpickle Ray writes under some .json names), without
    opening what they name (an older searcher state's Optuna database, ``pickles.load_detached``)."""
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        load_detached(data)
        return True
    except OlderState:  # whole, but of an older tune-llama: ``older_state`` says so
        return True
    except Exception:  # truncated or foreign: any unpickling error means unusable
        return False


def back_up_state(experiment: Path, since: float = 0.0) -> float:
    """Copy each of Ray's newest state files aside if one changed after ``since`` (an mtime) and it loads
    (write and rename: never half a copy); returns the newest mtime seen."""
    backup = Path(experiment) / GOOD_STATE
    newest = since
    for pattern in STATE_GLOBS:
        source = newest_state(experiment, pattern)
        try:
            mtime = source.stat().st_mtime if source else 0.0
            if mtime <= since:
                continue
            data = source.read_bytes()
            if not data or not _loads(data):
                continue
            backup.mkdir(exist_ok=True)
            replace_file(backup / source.name, data)
            newest = max(newest, mtime)
        except OSError:  # the disk is full: the previous good copy stays
            continue
    return newest


def repair_state(experiment: Path) -> Optional[str]:
    """Put the last good copy back for each newest state file that does not load; returns what was repaired,
    or None when nothing needed it. A damaged file without a good copy is a ``UserError``: Tune would start over."""
    repaired = []
    for pattern in STATE_GLOBS:
        source = newest_state(experiment, pattern)
        if source is None:
            continue
        data = source.read_bytes()
        if data and _loads(data):
            continue
        good = Path(experiment) / GOOD_STATE / source.name
        if not good.is_file():
            from tune_llama.errors import UserError
            raise UserError(f"--resume: {source} was cut short (a full disk?) and no good copy of it was kept; "
                            "Tune cannot resume this search (its checkpoints are intact: export still works)")
        source.write_bytes(good.read_bytes())
        repaired.append(source.name)
    return ", ".join(repaired) or None


# ---------------------------------------------------------------- a multi-worker trial's placement group

# Private Ray APIs (ray.experimental.internal_kv, ray._raylet.PlacementGroupID), checked on 2.60.0.
# When Tune ends a trial itself (an ASHA stop, also the one at max_t), it kills the trial's process, and with
# it Ray Train's controller and workers, before Train can remove its placement group. Train's own cleaner
# asks Ray's state API, which is served by the dashboard (a search starts Ray without it) and gives up when
# several Ray instances share the machine (seen here). The group would hold the workers' CPUs and GPUs
# until the search ends, and the next trial would wait for them forever. So rank 0 records the group under
# the trial's id in Ray's cluster-wide key-value store, and the search removes it when the trial ends.
KV_NAMESPACE = "tune_llama"


def register_placement_group(trial_id: str) -> None:
    from ray.experimental import internal_kv
    from ray.util import get_current_placement_group
    group = get_current_placement_group()
    if group is not None:
        internal_kv._internal_kv_put(f"workers:{trial_id}", group.id.hex(), overwrite=True, namespace=KV_NAMESPACE)


def release_placement_group(trial_id: str) -> None:
    """Remove the placement group a trial's workers ran in, if it is still there."""
    from ray._raylet import PlacementGroupID
    from ray.experimental import internal_kv
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
    key = f"workers:{trial_id}"
    recorded = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
    if not recorded:
        return
    group = PlacementGroup(PlacementGroupID(bytes.fromhex(recorded.decode())))
    if placement_group_table(group).get("state") not in (None, "REMOVED"):
        remove_placement_group(group)
    internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


def session_dir() -> Optional[Path]:
    """The running Ray's session folder (its logs, the raylet's ``logs/debug_state.txt``), None when this
    process has no Ray. Public only as ``ray.init``'s return value, which the search's caller never sees
    (bench/scale.py reads the object store from it)."""
    import ray
    from ray._private import worker
    node = getattr(worker, "_global_node", None)
    return Path(node.get_session_dir_path()) if ray.is_initialized() and node is not None else None


# ---------------------------------------------------------------- Ray's OptunaSearch, pointed at a rebuilt study

# Private attributes of ray.tune.search.optuna.OptunaSearch, checked on 2.60.0: ``_storage`` and ``_study_name``
# (where its study lives), ``_sampler``, ``_ot_study`` (the study it asks and tells), ``_ot_trials`` (Ray trial
# id -> optuna.Trial) and ``_completed_trials`` (Ray trial ids it already told). Its ``save``/``restore``
# pickle all of them; after a rebuild of optuna.db (tune_llama.study) the pickled trials point at rows of the
# old database, so the searcher must be pointed at the new study's rows.
OPTUNA_SEARCH_ATTRIBUTES = ("_storage", "_study_name", "_sampler", "_ot_study", "_ot_trials", "_completed_trials")


def optuna_search_study(searcher) -> tuple[Any, str, Any]:
    """(storage, study name, sampler) of a Ray OptunaSearch."""
    return searcher._storage, searcher._study_name, searcher._sampler


def optuna_search_trials(searcher) -> tuple[Any, dict[str, Any]]:
    """(the study a Ray OptunaSearch asks and tells, Ray trial id -> its optuna.Trial)."""
    return searcher._ot_study, dict(searcher._ot_trials)


def point_optuna_search_at(searcher, study, trials: dict[str, Any], finished: set[str]) -> None:
    """Make a Ray OptunaSearch ask and tell ``study``: ``trials`` (Ray trial id -> optuna.Trial) replace the
    ones it knew, and ``finished`` (Ray trial ids the study holds as ended) are the ones it will not tell."""
    searcher._ot_study = study
    searcher._ot_trials = dict(trials)
    searcher._completed_trials = set(finished)


def stop_trial(controller, trial) -> None:
    """Stop a PAUSED or PENDING trial from a scheduler: ``TuneController.stop_trial``, which Ray's own
    ``HyperBandScheduler`` calls for the paused trials a bracket drops (tells the searcher the trial is done).

    For a trial without an actor (paused), Ray 2.60 sets it TERMINATED but returns before
    ``_mark_trial_to_checkpoint``, so the experiment state keeps the cached PAUSED entry and a reader (or a
    resume) would see an unfinished trial: marking it here writes the new status.
    """
    controller.stop_trial(trial)
    controller._mark_trial_to_checkpoint(trial)


def forget_tune_state(experiment: Path) -> None:
    """Remove Tune's files (and the study and scheduler records made with them) from a search that was killed
    before Tune saved its first experiment state, so it can start again in its folder: no trial was recorded,
    and a Tune state without an experiment state cannot be restored."""
    import shutil
    for pattern in (*RAY_STATE_GLOBS, "optuna.db*", "scheduler.json"):
        for path in Path(experiment).glob(pattern):
            path.unlink(missing_ok=True)
    shutil.rmtree(Path(experiment) / GOOD_STATE, ignore_errors=True)


def raise_total_samples(experiment: Path, total: int) -> None:
    """Let a restored search create trials up to ``total``: the newest ``search_gen_state-*.json`` (a
    cloudpickled dict written by ``SearchGenerator.save_to_dir``; Ray restores the newest by name) holds
    ``total_samples``, which overrides the restored run's ``num_samples``, and ``finished``.

    Ray's ``Tuner.restore`` takes no ``TuneConfig``, so there is no public way to change ``num_samples``.
    """
    from ray import cloudpickle
    states = sorted(Path(experiment).glob(SEARCH_GENERATOR_STATE_GLOB))
    if not states:
        raise FileNotFoundError(f"{experiment}: no {SEARCH_GENERATOR_STATE_GLOB} (Tune's search generator state)")
    state = cloudpickle.loads(states[-1].read_bytes())
    state["total_samples"], state["finished"] = total, False
    replace_file(states[-1], cloudpickle.dumps(state))


def total_samples(experiment: Path) -> Optional[int]:
    """The trials the newest search generator state lets the search create (None without one)."""
    from ray import cloudpickle
    states = sorted(Path(experiment).glob(SEARCH_GENERATOR_STATE_GLOB))
    return cloudpickle.loads(states[-1].read_bytes())["total_samples"] if states else None


# ---------------------------------------------------------------- checkpoints a killed search's state still lists

# Private: Trial.run_metadata.checkpoint_manager._checkpoint_results, checked on 2.60.0. Tune saves its state
# every few seconds but deletes a trial's worst checkpoint (CheckpointConfig.num_to_keep) the moment a new one
# is registered; a search killed in between resumes with a state that lists a folder already gone. The next
# registration then deletes it again, and Ray's _delete_fs_path raises on a missing path outside its own
# try (a traceback in the log, and the rest of that checkpoint's bookkeeping skipped).


def forget_lost_checkpoints(trial) -> int:
    """Drop from ``trial``'s kept checkpoints those whose folder is gone; how many were dropped.

    A lost latest checkpoint (``_latest_checkpoint_result``) is one Tune deleted after registering a newer one
    its saved state never heard of; Ray's restore raises on it before the trial's code runs (an errored trial,
    seen in ``bench/chaos.py``). The trial goes on from the newest kept checkpoint instead, else from the
    newest checkpoint with weights in its folder.
    """
    from pyarrow.fs import FileType

    from tune_llama import checkpoint as files
    manager = trial.run_metadata.checkpoint_manager

    def gone(result) -> bool:
        return result.checkpoint.filesystem.get_file_info(result.checkpoint.path).type == FileType.NotFound
    kept = [result for result in manager._checkpoint_results if not gone(result)]
    lost = len(manager._checkpoint_results) - len(kept)
    manager._checkpoint_results = kept
    latest = manager._latest_checkpoint_result
    if latest is not None and latest.checkpoint is not None and gone(latest):
        newest = max(kept, key=lambda result: Path(result.checkpoint.path).name, default=None)
        on_disk = [f for f in files.folders(Path(latest.checkpoint.path).parent) if files.holds_weights(f)]
        if newest is None and on_disk:
            newest = type(latest)(type(latest.checkpoint)(str(on_disk[-1]), latest.checkpoint.filesystem),
                                  files.read_metrics(on_disk[-1]) or {})
        manager._latest_checkpoint_result = newest
    return lost


# ---------------------------------------------------------------- a search's pickled state, wherever its folder is now

# Private: the state ``Tuner.restore`` reads, ``tuner.pkl`` (``TunerInternal.__getstate__``: a cloudpickled dict
# whose ``_tune_config`` and ``_run_config`` hold the search algorithm, the scheduler, the callbacks and the
# stopper as they were built at the first start), and ``OptunaSearch.save``'s pickle of the searcher's
# ``__dict__``, checked on 2.60.0. ``Tuner.restore`` takes no ``RunConfig`` or ``TuneConfig``, and Tune writes
# ``tuner.pkl`` only at a search's first start: every object in it names the folder of that start, and an Optuna
# RDBStorage in it opens that folder's optuna.db as it is unpickled. So a resume writes the objects built for the
# folder being resumed into it first (``point_tuner_state_at``), and reads old pickles with the Optuna
# storages left closed (``pickles.load_detached``).

def older_state(experiment: Path) -> Optional[str]:
    """The piece of tune-llama this version lacks that the search's saved state (``tuner.pkl``, the newest
    searcher and search generator states) refers to; None when all of it loads here."""
    for path in [Path(experiment) / TUNER_STATE, newest_state(experiment, SEARCHER_STATE_GLOB),
                 newest_state(experiment, SEARCH_GENERATOR_STATE_GLOB)]:
        if path is None or not path.is_file():
            continue
        try:
            load_detached(path.read_bytes())
        except OlderState as err:
            return err.name
        except Exception:  # cut short or foreign: repair_state and Tune's own checks say so
            continue
    return None


def point_tuner_state_at(experiment: Path, tune_config, run_config) -> None:
    """Make ``experiment``'s ``tuner.pkl`` hold ``tune_config`` and ``run_config`` (built for this folder: its
    searcher, scheduler, callbacks and stopper) in place of those of the search's first start."""
    from ray import cloudpickle
    path = Path(experiment) / TUNER_STATE
    state = load_detached(path.read_bytes())
    missing = {"_tune_config", "_run_config"} - set(state)
    if missing:
        raise KeyError(f"{path}: Tune's tuner state has no {sorted(missing)} (checked on Ray {CHECKED_RAY_VERSION})")
    state["_tune_config"], state["_run_config"] = tune_config, run_config
    replace_file(path, cloudpickle.dumps(state))


def point_search_generator_at(experiment: Path) -> None:
    """Make the newest ``search_gen_state-*.json`` create its new trials in ``experiment``.

    Tune's search generator restores the ``Experiment`` of the search's first start (``SearchGenerator.get_state``:
    a cloudpickled dict whose ``experiment`` holds a ``StorageContext``), and every trial it creates after a
    resume (``--more``, or one not yet created) gets that storage: its folder, result rows and checkpoints
    went to the first start's folder. Restored trials are pointed at the new folder by Tune itself
    (``TuneController._restore_trials``); this does the same for the trials still to come.
    """
    from ray import cloudpickle
    path = newest_state(experiment, SEARCH_GENERATOR_STATE_GLOB)
    if path is None:
        return
    state = cloudpickle.loads(path.read_bytes())
    storage = state["experiment"].storage  # also the ``storage`` of the experiment's spec: the same object
    folder = Path(experiment).resolve()
    if (storage.storage_fs_path, storage.experiment_dir_name) == (folder.parent.as_posix(), folder.name):
        return
    storage.storage_fs_path, storage.experiment_dir_name = folder.parent.as_posix(), folder.name
    replace_file(path, cloudpickle.dumps(state))


OPTUNA_SEARCH_STORED = ("_storage", "_ot_study", "_ot_trials")
"""The attributes of Ray's OptunaSearch that hold (or reach) its Optuna storage."""


def detached_optuna_search_state(searcher) -> dict[str, Any]:
    """A Ray OptunaSearch's ``__dict__`` as ``save`` pickles it, without its storage: the study's trials as
    their storage row ids (``ot_trial_ids``, Ray trial id -> row id); ``attach_optuna_search`` opens them again."""
    state = {k: v for k, v in searcher.__dict__.items() if k not in OPTUNA_SEARCH_STORED}
    if searcher.__dict__.get("_ot_study") is not None:  # attached: its trials are the ones it asks and tells
        state["ot_trial_ids"] = {ray_id: trial._trial_id for ray_id, trial in searcher._ot_trials.items()}
    return state


def saved_optuna_search_state(data: bytes) -> dict[str, Any]:
    """What ``OptunaSearch.save`` wrote (by this version or, with the storage inside, an older one), detached."""
    state = load_detached(data)
    trials = state.get("_ot_trials") or {}
    detached = {k: v for k, v in state.items() if k not in OPTUNA_SEARCH_STORED}
    if trials:  # an older version's: the trials themselves, their study and storage inside
        detached["ot_trial_ids"] = {ray_id: trial._trial_id for ray_id, trial in trials.items()}
    return detached


def attach_optuna_search(searcher, storage, study_name: str) -> None:
    """Open a Ray OptunaSearch's study in ``storage`` (the folder's optuna.db) under ``study_name``, its trials
    the rows ``ot_trial_ids`` names; before its search space is set, only the storage."""
    import optuna
    searcher._storage, searcher._study_name = storage, study_name
    searcher._ot_study, searcher._ot_trials = None, {}
    if not getattr(searcher, "_space", None):
        return  # set_search_properties creates (or loads) the study
    searcher._ot_study = optuna.load_study(study_name=study_name, storage=storage, sampler=searcher._sampler)
    searcher._ot_trials = {ray_id: optuna.trial.Trial(searcher._ot_study, row)
                           for ray_id, row in searcher.__dict__.get("ot_trial_ids", {}).items()}


# ---------------------------------------------------------------- the search's own files in a resumed run's staging

# Private: ``_ExperimentCheckpointManager.sync_down_experiment_state``, checked on 2.60.0. A resumed run copies every
# ``*.json`` and ``*.pkl`` at the top of the search folder into the driver's staging folder, and each sync of its
# state uploads that folder back: a file of ours that changes during the run (``scheduler.json``) went back to
# its copy from the run's start every few seconds.
RAY_STATE_GLOBS = (*STATE_GLOBS, TUNER_STATE)
"""The files at the top of a search folder that are Ray's own state: the ones the staging folder must keep."""


def drop_staged_copies(staging: Path) -> list[str]:
    """Remove from a run's driver staging folder the copies of the search's own files (not Ray's state, which
    Ray rewrites there itself); the names removed."""
    staging = Path(staging)
    ours = [p for p in (*staging.glob("*.json"), *staging.glob("*.pkl"))
            if p.is_file() and not any(p.match(pattern) for pattern in RAY_STATE_GLOBS)]
    for path in ours:
        path.unlink(missing_ok=True)
    return sorted(p.name for p in ours)
