"""Every use of Ray Tune internals, in one place, checked against ray 2.60.0.

Ray has no public reader for a search that is still running, was killed or is
being resumed (``ray.tune.ExperimentAnalysis`` wants a consistent state and
Ray itself), so tune-llama reads two things Ray does not promise to keep:

* ``experiment_state-*.json``: ``{"trial_data": [[trial_json, run_metadata_json], ...]}``,
  written by ``TuneController.save_to_dir`` (``CKPT_FILE_TMPL``); the trial JSON
  holds ``trial_id``, ``status``, ``config``, ``relative_logdir``, the run
  metadata JSON holds ``error_filename`` (``error.txt``) when the trial errored;
* trial folder names, ``Trial._generate_dirname``: ``TRAINABLE_TRIALID_N_params_DATE``,
  e.g. ``train_trial_51d262fe_3_lr=0.001_2025-01-01_00-00-00``, where N is the
  trial's sequence number in the search.

and, driving a search, three more: ``search_gen_state-*.json`` (``total_samples``, raised by ``--more``),
``TuneController.stop_trial`` and ``_mark_trial_to_checkpoint`` (the halving scheduler stops paused trials),
a trial's kept checkpoints (a resumed search forgets those a kill left listed but deleted);
for bench/scale.py, the session folder of the running Ray (``ray._private.worker._global_node``).
One more, a method to override, lives with the subclasses that override it, as it needs Ray imported:
``LoggerCallback._restore_from_remote`` (``tune_llama.callbacks.KeepDriverCopy``).

``tests/integration/test_ray_private_against_real_tune.py`` runs a real Tune experiment and fails, naming the
piece, when any of this changes; ``pyproject.toml`` pins ``ray`` to the minor
versions it was checked on. No Ray import at module level: export and report read searches
where Ray is not installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from tune_llama.paths import read_json

CHECKED_RAY_VERSION = "2.60.0"
EXPERIMENT_STATE_GLOB = "experiment_state-*.json"
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
STATE_GLOBS = (EXPERIMENT_STATE_GLOB, "search_gen_state-*.json", "searcher-state-*.pkl")


def newest_state(experiment: Path, pattern: str = EXPERIMENT_STATE_GLOB) -> Optional[Path]:
    """The state file of the newest Tune session: Ray names them by the session's start time
    (``experiment_state-2026-11-28_18-18-47.json``) and picks the greatest name on restore, so do we. Not the
    newest mtime: at a search's end Ray copies every file again, an earlier session's too, in any order."""
    return max(Path(experiment).glob(pattern), key=lambda p: p.name, default=None)


def _loads(data: bytes) -> bool:
    """Whether a state file's bytes load (JSON, or the cloudpickle Ray writes under some .json names)."""
    import pickle
    try:
        json.loads(data)
        return True
    except ValueError:
        pass
    try:
        pickle.loads(data)
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
            tmp = backup / f".{source.name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(backup / source.name)
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


SEARCH_GENERATOR_STATE_GLOB = "search_gen_state-*.json"


def raise_total_samples(experiment: Path, total: int) -> None:
    """Let a restored search create trials up to ``total``: the newest ``search_gen_state-*.json`` (a
    cloudpickled dict written by ``SearchGenerator.save_to_dir``; Ray restores the newest by name) holds
    ``total_samples``, which overrides the restored run's ``num_samples``, and ``finished``.

    Ray's ``Tuner.restore`` takes no ``TuneConfig``, so there is no public way to change ``num_samples``.
    """
    import os

    from ray import cloudpickle
    states = sorted(Path(experiment).glob(SEARCH_GENERATOR_STATE_GLOB))
    if not states:
        raise FileNotFoundError(f"{experiment}: no {SEARCH_GENERATOR_STATE_GLOB} (Tune's search generator state)")
    state = cloudpickle.loads(states[-1].read_bytes())
    state["total_samples"], state["finished"] = total, False
    tmp = states[-1].with_name(f".{states[-1].name}.tmp")
    tmp.write_bytes(cloudpickle.dumps(state))
    os.replace(tmp, states[-1])


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

    The trial's latest checkpoint is left alone: a resumed trial handed a lost one restores from an older
    folder (``trainable.restore``), and Tune never deletes the latest.
    """
    from pyarrow.fs import FileType
    manager = trial.run_metadata.checkpoint_manager
    kept = [result for result in manager._checkpoint_results
            if result.checkpoint.filesystem.get_file_info(result.checkpoint.path).type != FileType.NotFound]
    lost = len(manager._checkpoint_results) - len(kept)
    manager._checkpoint_results = kept
    return lost
