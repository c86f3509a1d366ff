"""The Ray internals tune-llama reads (tune_llama/ray_private.py), checked on the files and classes of the
installed Ray without starting it: folder names, session states, the searcher's study, the controller's and the
result loggers' methods. ``tests/integration/test_ray_private_against_real_tune.py`` checks them against a real
Tune run.

When one of these fails after a Ray upgrade, the message names the piece that changed: fix
tune_llama/ray_private.py, then move the upper bound of ``ray`` in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tune_llama.ray_private import (CHECKED_RAY_VERSION, TRAINABLE_NAME, read_trial_states, trial_id_from_name,
                                    trial_sequence_number)


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_search_folder_without_ray_state_has_no_trial_states(tmp_path):
    assert read_trial_states(tmp_path) == []
    (tmp_path / "experiment_state-2025.json").write_text('{"trial_data": [["{not json"]]}')  # being written
    assert read_trial_states(tmp_path) == []


def test_the_newest_session_state_is_read_even_when_an_older_one_was_copied_last(tmp_path):
    """At a resumed search's end Ray copies every state file again, the killed session's too, in any order:
    its stale RUNNING trials must not be read as the search's state (a clean-clone run failed on this)."""
    import json
    import os

    def state(name: str, status: str) -> Path:
        path = tmp_path / f"experiment_state-{name}.json"
        path.write_text(json.dumps({"trial_data": [[json.dumps({"trial_id": "t1", "status": status}), "{}"]]}))
        return path

    newer, older = state("2026-11-28_18-18-47", "TERMINATED"), state("2026-11-28_18-18-24", "RUNNING")
    os.utime(older, (newer.stat().st_mtime + 1,) * 2)
    assert [t["status"] for t in read_trial_states(tmp_path)] == ["TERMINATED"]


def test_folder_names_of_tunes_default_variant_generator_parse_too():
    name = "train_trial_24d0c_00001_1_x=2_2026-11-28_14-01-07"  # ray 2.60, tune.grid_search without a searcher
    assert trial_id_from_name(name) == "24d0c_00001" and trial_sequence_number(name) == 1


def test_names_that_are_not_ray_trial_folders_are_left_alone():
    assert trial_id_from_name("checkpoint_000001") == "checkpoint_000001"
    assert trial_sequence_number("train_trial_51d262fe_lr=0.1") == 0


def test_reading_a_search_does_not_import_ray():
    # export and report read searches on machines without Ray.
    code = ("import sys, tune_llama.ray_private; "
            "sys.exit(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0, "ray_private imports Ray"


def test_a_resumed_trial_repeating_a_reported_step_keeps_the_first_value_without_a_warning(tmp_path, recwarn):
    import warnings

    import optuna
    from ray import tune

    from tune_llama.searcher import ResumableOptunaSearch
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = ResumableOptunaSearch(space={"lr": tune.uniform(0.0, 1.0)}, metric="eval_loss", mode="min",
                                     search_dir=tmp_path, study_name="s", sampler=optuna.samplers.TPESampler(seed=0))
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"eval_loss": 0.5, "training_iteration": 2})
    warnings.simplefilter("always")  # a warning shown once already would otherwise pass unseen
    searcher.on_trial_result("t1", {"eval_loss": 0.5, "training_iteration": 2})  # after a resume

    assert [str(w.message) for w in recwarn] == []
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.intermediate_values == {2: 0.5}
    study = optuna.load_study(study_name="s", storage=storage)
    with pytest.warns(UserWarning, match="already reported"):  # Optuna itself still warns: the filter is ours
        optuna.trial.Trial(study, trial._trial_id).report(0.5, 2)


def test_a_trial_stopped_without_a_result_is_complete_at_its_last_report_not_pruned(tmp_path):
    # The halving scheduler stops a trial paused at a rung; Tune then tells the searcher with no result.
    import optuna
    from ray import tune

    from tune_llama.searcher import ResumableOptunaSearch
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = ResumableOptunaSearch(space={"lr": tune.uniform(0.0, 1.0)}, metric="eval_loss", mode="min",
                                     search_dir=tmp_path, study_name="s", sampler=optuna.samplers.TPESampler(seed=0))
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"eval_loss": 0.7, "training_iteration": 1})
    searcher.on_trial_result("t1", {"eval_loss": 0.6, "training_iteration": 2})
    searcher.on_trial_complete("t1", None)

    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.6
    assert trial.intermediate_values == {1: 0.7, 2: 0.6}


def test_optuna_search_keeps_its_study_and_trials_where_ray_private_reads_and_sets_them(tmp_path):
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from tune_llama.ray_private import OPTUNA_SEARCH_ATTRIBUTES, optuna_search_study, point_optuna_search_at
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    sampler = optuna.samplers.RandomSampler(seed=0)
    searcher = OptunaSearch(sampler=sampler, storage=storage, study_name="s", metric="m", mode="min")
    searcher.set_search_properties(None, None, {"x": tune.uniform(0, 1)})
    assert all(hasattr(searcher, name) for name in OPTUNA_SEARCH_ATTRIBUTES), \
        "ray.tune.search.optuna.OptunaSearch renamed its attributes: fix ray_private.point_optuna_search_at"
    assert optuna_search_study(searcher) == (storage, "s", sampler)
    searcher.suggest("a")
    other = optuna.create_study(storage=storage, study_name="other")
    trial = other.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    point_optuna_search_at(searcher, other, {"b": trial}, set())
    searcher.on_trial_result("b", {"m": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("b", {"m": 0.25, "training_iteration": 2})
    (told,) = other.get_trials()
    assert told.value == 0.25 and told.intermediate_values == {1: 0.5}


def test_the_tune_controller_still_has_the_methods_the_halving_scheduler_stops_paused_trials_with():
    from ray.tune.execution.tune_controller import TuneController
    assert callable(getattr(TuneController, "stop_trial", None)), "TuneController.stop_trial is gone"
    assert callable(getattr(TuneController, "_mark_trial_to_checkpoint", None)), (
        "TuneController._mark_trial_to_checkpoint is gone: a paused trial the halving scheduler stops would stay "
        "PAUSED in the experiment state")


def test_tunes_result_loggers_restore_a_trials_files_through_the_method_ray_private_overrides():
    import inspect

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, LoggerCallback

    from tune_llama.callbacks import result_loggers
    assert list(inspect.signature(LoggerCallback._restore_from_remote).parameters) == ["self", "file_name", "trial"], \
        f"LoggerCallback._restore_from_remote changed (checked {CHECKED_RAY_VERSION}): fix callbacks.KeepDriverCopy"
    for base in (JsonLoggerCallback, CSVLoggerCallback):
        assert "self._restore_from_remote(" in inspect.getsource(base), f"{base.__name__} no longer restores this way"
    json_logger, csv_logger = result_loggers()
    assert isinstance(json_logger, JsonLoggerCallback) and isinstance(csv_logger, CSVLoggerCallback)
    import tune_llama.callbacks as module
    assert all(getattr(module, type(logger).__name__) is type(logger) for logger in result_loggers())  # unpickling


def test_a_trial_forgets_kept_checkpoints_whose_folders_are_gone_and_registers_the_next_without_an_error(tmp_path):
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    from tune_llama.ray_private import forget_lost_checkpoints
    trial = Trial(TRAINABLE_NAME, stub=True,
                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="eval_loss",
                                                          checkpoint_score_order="min"))

    def register(index: int, eval_loss: float) -> Path:
        folder = tmp_path / f"checkpoint_{index:06d}"
        folder.mkdir()
        trial.run_metadata.checkpoint_manager.register_checkpoint(
            _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(folder)), metrics={"eval_loss": eval_loss}))
        return folder

    first, second = register(0, 3.0), register(1, 2.0)
    # What a killed search resumes with: its saved state lists the first checkpoint, which Tune deleted after
    # the save when the third was registered.
    first.rmdir()
    assert forget_lost_checkpoints(trial) == 1, (
        f"Trial.run_metadata.checkpoint_manager._checkpoint_results changed (checked {CHECKED_RAY_VERSION}): "
        f"fix ray_private.forget_lost_checkpoints")
    third = register(2, 1.0)  # with the lost folder still listed, Ray's deletion raises FileNotFoundError
    kept = [Path(r.checkpoint.path) for r in trial.run_metadata.checkpoint_manager._checkpoint_results]
    assert sorted(kept) == [second, third] and second.is_dir() and third.is_dir()
    assert forget_lost_checkpoints(trial) == 0


def test_a_trial_whose_latest_checkpoint_is_lost_goes_on_from_its_newest_kept_one_or_the_newest_on_disk(tmp_path):
    """A kill after Tune registered a newer checkpoint (and deleted the one its saved state calls the latest),
    before it saved its state again: Ray's restore raises on the lost folder, so the trial must be handed
    another (seen in bench/chaos.py: two errored trials of 8 after 20 kills)."""
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    from tune_llama import checkpoint as files
    from tune_llama.ray_private import forget_lost_checkpoints
    trial = Trial(TRAINABLE_NAME, stub=True,
                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="eval_loss",
                                                          checkpoint_score_order="min"))
    manager = trial.run_metadata.checkpoint_manager

    def register(index: int, eval_loss: float) -> Path:
        folder = tmp_path / f"checkpoint_{index:06d}"
        folder.mkdir()
        (folder / files.TRAINABLE).write_bytes(b"weights")
        files.write_json(folder, files.METRICS, {"eval_loss": eval_loss, "step": index})
        manager.register_checkpoint(_TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(folder)),
                                                    metrics={"eval_loss": eval_loss}))
        return folder

    first, second = register(0, 2.0), register(1, 3.0)
    for path in second.iterdir():
        path.unlink()
    second.rmdir()  # the latest, deleted after a newer one the saved state never heard of
    forget_lost_checkpoints(trial)
    assert Path(trial.checkpoint.path) == first, "_latest_checkpoint_result changed: fix forget_lost_checkpoints"

    for path in first.iterdir():
        path.unlink()
    first.rmdir()
    newer = tmp_path / "checkpoint_000002"  # on disk, never registered: the one left to go on from
    newer.mkdir()
    (newer / files.TRAINABLE).write_bytes(b"weights")
    files.write_json(newer, files.METRICS, {"eval_loss": 1.0, "step": 2})
    forget_lost_checkpoints(trial)
    assert Path(trial.checkpoint.path) == newer and manager.latest_checkpoint_result.metrics["step"] == 2
