"""What a resume reads is the folder being resumed: the searcher's pickles hold no database path, an old pickle's
database is left closed, trials a killed driver asked for are closed, and a folder saved by an older
tune-llama is one line (no Ray started)."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import optuna
import pytest
from ray import cloudpickle, tune

from conftest import TINY, one_line_error
from tune_llama.__main__ import command
from tune_llama.pickles import Detached, load_detached
from tune_llama.results import SPEC_FILE
from tune_llama.searcher import ResumableOptunaSearch
from tune_llama.spec import load_spec

SPACE = {"lr": tune.uniform(0.0, 1.0)}


def searcher(folder: Path, study_name: str = "s", **kwargs) -> ResumableOptunaSearch:
    found = ResumableOptunaSearch(search_dir=folder, study_name=study_name,
                                  sampler=optuna.samplers.RandomSampler(seed=0), **kwargs)
    found.set_search_properties("eval_loss", "min", SPACE)
    return found


def trials(folder: Path, study_name: str = "s") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{folder / 'optuna.db'}").trials


def test_a_restored_searcher_tells_the_study_of_its_own_folder_even_when_the_saved_ones_is_gone(tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    old = searcher(first)
    old.suggest("t1")
    old.on_trial_result("t1", {"eval_loss": 0.7, "training_iteration": 1})
    old.save(str(tmp_path / "searcher-state.pkl"))
    assert b"optuna.db" not in (tmp_path / "searcher-state.pkl").read_bytes() + cloudpickle.dumps(old), \
        "a pickle of the searcher names a database"
    first.rename(moved)  # the folder moved: its first path is gone

    new = searcher(moved)
    new.restore(str(tmp_path / "searcher-state.pkl"))
    new.on_trial_complete("t1", {"eval_loss": 0.5, "training_iteration": 2})
    (told,) = trials(moved)
    assert told.state == optuna.trial.TrialState.COMPLETE and told.value == 0.5
    assert told.intermediate_values == {1: 0.7, 2: 0.5}
    assert not first.exists()


def test_an_older_pickle_whose_database_is_gone_loads_with_its_storage_left_closed(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    data = cloudpickle.dumps({"_storage": storage})  # as Ray's OptunaSearch.save pickled it before
    shutil.rmtree(folder)
    with pytest.raises(Exception):
        pickle.loads(data)  # Optuna's storage opens its database as it is unpickled
    loaded = load_detached(data)["_storage"]
    assert isinstance(loaded, Detached) and loaded.url.endswith("gone/optuna.db")
    assert not folder.exists()


def test_trials_asked_by_a_driver_killed_before_tune_saved_them_are_closed_on_restore(tmp_path):
    saved = searcher(tmp_path, points_to_evaluate=[{"lr": 0.25}])
    saved.save(str(tmp_path / "before.pkl"))  # Tune's last save before the kill
    saved.suggest("t1")  # asked for the queued config, then killed before Tune saved again
    saved.suggest("t2")

    resumed = searcher(tmp_path)
    resumed.restore(str(tmp_path / "before.pkl"))
    states = [t.state for t in trials(tmp_path)]
    assert optuna.trial.TrialState.RUNNING not in states, states
    assert resumed.suggest("t3") == {"lr": 0.25}, "the queued config the killed driver took is not asked again"


def test_a_search_started_by_an_older_tune_llama_is_one_line_on_resume(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / SPEC_FILE).write_text(json.dumps(load_spec(TINY).to_dict()))
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    renamed = types.ModuleType("tune_llama.progress")  # a module of an older version, gone since

    class TrialTable:
        pass
    TrialTable.__module__, TrialTable.__qualname__ = renamed.__name__, "TrialTable"
    renamed.TrialTable = TrialTable
    monkeypatch.setitem(sys.modules, renamed.__name__, renamed)
    (folder / "tuner.pkl").write_bytes(cloudpickle.dumps({"_run_config": TrialTable()}))
    monkeypatch.delitem(sys.modules, renamed.__name__)
    before = sorted(p.name for p in folder.iterdir())

    err = one_line_error(command("search"), ["--resume", str(folder)], capsys)
    assert "started by an older tune-llama" in err and "tune_llama.progress" in err
    assert "start a new search with search.warm_start:" in err
    assert sorted(p.name for p in folder.iterdir()) == before, "the refused resume wrote into the folder"
