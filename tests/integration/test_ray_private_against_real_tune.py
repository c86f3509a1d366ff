"""The Ray internals tune-llama reads (tune_llama/ray_private.py) are still what a real Tune run writes: the
experiment state, errored trials, folder names, the session folder, the searcher's closed trials.

When one of these fails after a Ray upgrade, the message names the piece that changed: fix
tune_llama/ray_private.py, then move the upper bound of ``ray`` in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tune_llama.ray_private import (CHECKED_RAY_VERSION, TRAINABLE_NAME, read_trial_states, trial_id_from_name,
                                    trial_sequence_number)


# Three trials created as tune-llama creates them (OptunaSearch, a trainable called train_trial); the
# second one raises.
TUNE_RUN = textwrap.dedent(f"""
    import sys
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    def {TRAINABLE_NAME}(config):
        if config["x"] == 2:
            raise ValueError("boom at x=2")
        tune.report({{"score": float(config["x"])}})

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    searcher = OptunaSearch(points_to_evaluate=[{{"x": 1}}, {{"x": 2}}, {{"x": 3}}])
    tune.Tuner({TRAINABLE_NAME}, param_space={{"x": tune.choice([1, 2, 3])}},
               tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=3, search_alg=searcher,
                                           max_concurrent_trials=1),
               run_config=tune.RunConfig(name="exp", storage_path=sys.argv[1], verbose=0,
                                         failure_config=tune.FailureConfig(max_failures=0))).fit()
""")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("ray_private")
    proc = subprocess.run([sys.executable, "-c", TUNE_RUN, str(storage)], cwd=storage, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "exp"


@pytest.fixture(scope="module")
def states(experiment) -> dict[int, dict]:
    """read_trial_states, by the trial's x."""
    found = read_trial_states(experiment)
    assert found, (f"read_trial_states found no trial in {experiment}: Ray (checked {CHECKED_RAY_VERSION}) no longer "
                   f"writes experiment_state-*.json with a 'trial_data' list; files: "
                   f"{sorted(p.name for p in experiment.iterdir())}")
    return {(s["config"] or {}).get("x"): s for s in found}


def test_the_experiment_state_holds_every_trial_with_id_status_config_and_folder(experiment, states):
    assert sorted(states) == [1, 2, 3], (
        f"experiment state entries lost their 'config': {list(states.values())}")
    for x, state in states.items():
        assert set(state) == {"trial_id", "status", "config", "relative_logdir", "error", "error_file"}
        assert isinstance(state["trial_id"], str) and state["trial_id"], f"no 'trial_id' in the trial JSON: {state}"
        assert state["config"] == {"x": x}
        assert state["relative_logdir"] and (experiment / state["relative_logdir"] / "params.json").is_file(), (
            f"'relative_logdir' no longer names the trial's folder under {experiment}: {state}")
    assert {x: s["status"] for x, s in states.items()} == {1: "TERMINATED", 2: "ERROR", 3: "TERMINATED"}, (
        "Ray's trial status names changed (results.py maps TERMINATED/ERROR/RUNNING/PENDING/PAUSED)")


def test_an_errored_trial_names_its_error_file_and_its_exception(experiment, states):
    errored = states[2]
    assert errored["error_file"], ("the run metadata of an errored trial has no 'error_filename' (or the file "
                                   f"is not in the trial folder): {errored}")
    error_file = Path(errored["error_file"])
    assert error_file.is_absolute() and error_file.is_file()
    assert error_file.parent == (experiment / errored["relative_logdir"]).resolve()
    assert "ValueError" in errored["error"] and "boom at x=2" in errored["error"], (
        f"the last line of Ray's error file is no longer the exception: {errored['error']!r}")
    for x in (1, 3):
        assert states[x]["error"] is None and states[x]["error_file"] is None


def test_trial_folder_names_carry_the_trial_id_and_the_sequence_number(experiment, states):
    folders = {x: Path(s["relative_logdir"]).name for x, s in states.items()}
    for x, name in folders.items():
        assert trial_id_from_name(name) == states[x]["trial_id"], (
            f"Ray's trial folder names are no longer TRAINABLE_TRIALID_N_params_DATE: {name!r}")
    numbers = [trial_sequence_number(folders[x]) for x in (1, 2, 3)]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3, (
        f"the number after the trial id in folder names is no longer the trial's sequence number: {folders}")


def test_session_dir_is_the_folder_ray_init_names_and_none_without_ray(tmp_path):
    script = textwrap.dedent("""
        from pathlib import Path
        import ray
        from tune_llama.ray_private import session_dir
        assert session_dir() is None
        context = ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        print(session_dir() == Path(context.address_info["session_dir"]), (session_dir() / "logs").is_dir())
        ray.shutdown()
        print(session_dir())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "None"], \
        f"ray._private.worker._global_node changed (checked {CHECKED_RAY_VERSION}): {proc.stdout} {proc.stderr[-2000:]}"


# ---------------------------------------------------------------- searcher: public hooks only

def test_the_searcher_drops_updates_to_a_trial_optuna_already_closed(tmp_path):
    # After a hard kill, Tune's snapshot can be older than the SQLite study: Tune replays epochs of a trial
    # that Optuna already closed. The search must go on, and the recorded value must stay.
    import optuna
    from ray import tune

    from tune_llama.searcher import ResumableOptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = ResumableOptunaSearch(space={"lr": tune.uniform(0.0, 1.0)}, metric="eval_loss", mode="min",
                                     search_dir=tmp_path, study_name="s", sampler=optuna.samplers.TPESampler(seed=0))
    assert searcher.suggest("t1") is not None
    study = optuna.load_study(study_name="s", storage=storage)
    study.tell(study.trials[0].number, 0.5)  # what the study held before the kill

    searcher.on_trial_result("t1", {"eval_loss": 0.4, "training_iteration": 3})
    searcher.on_trial_complete("t1", {"eval_loss": 0.4, "training_iteration": 3})

    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5
    assert trial.intermediate_values == {}
    assert searcher.suggest("t2") is not None, "the search must go on after a dropped update"


def test_the_search_generator_state_holds_total_samples_and_a_raised_count_is_what_a_restore_reads(experiment,
                                                                                                     tmp_path):
    import shutil

    from ray.tune.search import SearchGenerator
    from ray.tune.search.optuna import OptunaSearch
    from tune_llama.ray_private import raise_total_samples, total_samples
    assert total_samples(experiment) == 3, "search_gen_state-*.json no longer holds total_samples (--more)"
    copy = tmp_path / "exp"
    shutil.copytree(experiment, copy)
    raise_total_samples(copy, 5)
    generator = SearchGenerator(OptunaSearch())
    generator.restore_from_dir(str(copy))
    assert generator.total_samples == 5 and not generator.is_finished(), (
        "SearchGenerator.restore_from_dir no longer takes total_samples/finished from search_gen_state-*.json")


# ---------------------------------------------------------------- a folder resumed where it is now

def test_new_trials_of_a_restored_search_are_created_where_point_search_generator_at_says(experiment, tmp_path):
    import shutil

    from ray import cloudpickle
    from tune_llama.ray_private import newest_state, point_search_generator_at
    copy = tmp_path / "moved"
    shutil.copytree(experiment, copy)
    state = newest_state(copy, "search_gen_state-*.json")
    assert cloudpickle.loads(state.read_bytes())["experiment"].storage.experiment_fs_path == str(experiment), (
        "search_gen_state-*.json no longer holds the Experiment (with its StorageContext) new trials are made from")
    point_search_generator_at(copy)
    experiment_spec = cloudpickle.loads(state.read_bytes())["experiment"]
    assert experiment_spec.storage.experiment_fs_path == str(copy)
    assert experiment_spec.spec["storage"].experiment_fs_path == str(copy), "the spec's storage is another object now"


# A restore of the experiment with a callback written into tuner.pkl: at its first step it sees which files Ray
# staged, drops the copies of ours, and rewrites our file in the folder; the end of the run must not undo that.
RESTORE_WITH_PROBE = textwrap.dedent(f"""
    import json, sys
    from pathlib import Path
    import ray
    from ray import tune
    from tune_llama.ray_private import drop_staged_copies, point_tuner_state_at

    def {TRAINABLE_NAME}(config):
        tune.report({{"score": float(config["x"])}})

    class Probe(tune.Callback):
        seen = None
        def on_step_begin(self, iteration, trials, **info):
            if trials and self.seen is None:
                staging = Path(trials[0].local_experiment_path)
                self.seen = sorted(p.name for p in staging.iterdir())
                dropped = drop_staged_copies(staging)
                (folder / "ours.json").write_text('"live"')
                Path(sys.argv[2]).write_text(json.dumps({{"staged": self.seen, "dropped": dropped}}))

    folder = Path(sys.argv[1])
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    point_tuner_state_at(folder, tune.TuneConfig(metric="score", mode="max", num_samples=3),
                         tune.RunConfig(name=folder.name, storage_path=str(folder.parent), callbacks=[Probe()],
                                        verbose=0, failure_config=tune.FailureConfig(max_failures=0)))
    tune.Tuner.restore(str(folder), {TRAINABLE_NAME}, resume_errored=True).fit()
""")


def test_a_restore_takes_the_configs_written_into_tuner_pkl_and_its_staged_copies_of_our_files_can_go(experiment,
                                                                                                         tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(experiment, copy)
    (copy / "ours.json").write_text('"stale"')
    seen = tmp_path / "seen.json"
    proc = subprocess.run([sys.executable, "-c", RESTORE_WITH_PROBE, str(copy), str(seen)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seen.exists(), "Tuner.restore did not run the callback point_tuner_state_at wrote into tuner.pkl"
    found = json.loads(seen.read_text())
    assert "ours.json" in found["staged"], ("a resume no longer stages the search folder's *.json: "
                                            "ray_private.drop_staged_copies may be moot")
    assert found["dropped"] == ["ours.json"] and any(n.startswith("experiment_state-") for n in found["staged"])
    assert json.loads((copy / "ours.json").read_text()) == "live", "the run's end put the staged copy back"
