"""W&B tracking of a search: one offline run per trial inside the search folder, no secrets anywhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import read_wandb_run
from tune_llama.redact import SECRET_NAME


def reported_epochs(experiment: Path) -> dict[str, list[int]]:
    """Trial id -> epochs in its result.json."""
    out = {}
    for result in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = [r["epoch"] for r in rows]
    return out


# ---------------------------------------------------------------- the shared search

def test_every_trial_has_one_offline_run_in_the_search_folder_with_every_epoch(tiny_search):
    epochs = reported_epochs(tiny_search)
    run_dirs = sorted((tiny_search / "wandb").glob("offline-run-*"))
    runs = {d.name.rsplit("-", 1)[1]: read_wandb_run(d) for d in run_dirs}
    assert len(run_dirs) == len(epochs) and set(runs) == set(epochs)
    params = {json.loads(line)["trial_id"]: json.loads(line)["config"]
              for result in tiny_search.glob("*/result.json") for line in result.read_text().splitlines()[:1]}
    for trial_id, logged in runs.items():
        run = logged["run"]
        assert run.run_id == trial_id and run.run_group == tiny_search.name
        assert run.resume, "a restored trial must continue its run (resume='allow'), not replace it"
        assert [h["epoch"] for h in logged["history"]] == epochs[trial_id]
        assert all("eval_loss" in h and "eval_perplexity" in h for h in logged["history"])
        assert {k: logged["config"][k] for k in params[trial_id]} == params[trial_id]
        assert not any(k.startswith("config/") for h in logged["history"] for k in h), "params logged as metrics"
        assert logged["closed"], f"run {trial_id} was not finished: its last records may be missing"


def test_each_run_config_is_the_whole_resolved_spec_flat_with_numbers_kept_numbers(tiny_search):
    from tune_llama.results import load_search
    search = load_search(tiny_search)
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        logged = read_wandb_run(run_dir)
        config = logged["config"]
        (trial,) = [t for t in search.trials if t.trial_id == logged["run"].run_id]
        assert {k: config[k] for k in trial.params} == trial.params
        assert type(config["training.lr"]) is float and type(config["training.gradient_accumulation_steps"]) is int
        assert config["model.name"] == "random:tiny" and config["data.source"] == "synthetic"
        assert config["training.epochs"] == 4 and config["data.batch_size"] == 8 and config["search.num_samples"] == 6
        assert not [k for k in config if k.startswith("search.space")], "the distributions are not a run's setting"


RAY_KEYS = {"training_iteration", "time_since_restore", "time_this_iter_s", "time_total_s", "iterations_since_restore",
            "timesteps_total", "timesteps_since_restore", "date", "hostname", "node_ip", "pid", "trial_id",
            "experiment_tag", "checkpoint_dir_name", "done", "timestamp"}


def test_the_history_holds_the_trials_metrics_not_rays_bookkeeping(tiny_search):
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        history = read_wandb_run(run_dir)["history"]
        assert history and not {k for row in history for k in row} & RAY_KEYS


def test_each_runs_final_status_is_the_trials_state_in_the_words_of_results(tiny_search):
    from tune_llama.results import RUNG_STOPPED, load_search
    search = load_search(tiny_search)
    states = {t.trial_id: search.status(t) for t in search.trials}
    logged = {read_wandb_run(d)["run"].run_id: read_wandb_run(d)["summary"]["status"]
              for d in (tiny_search / "wandb").glob("offline-run-*")}
    assert logged == states and RUNG_STOPPED in logged.values()


def test_each_run_logs_every_report_and_keeps_the_best_eval_loss_in_its_summary(tiny_search):
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        logged = read_wandb_run(run_dir)
        for row in logged["history"]:
            assert {"epoch", "train_loss", "eval_loss", "eval_perplexity", "tokens_per_s"} <= set(row)
            assert all(isinstance(v, (int, float)) for v in row.values()), f"a non-number logged as a metric: {row}"
        summary = logged["summary"]
        losses = [h["eval_loss"] for h in logged["history"] if math.isfinite(h["eval_loss"])]
        assert isinstance(summary["best_eval_loss"], float) and summary["best_eval_loss"] == min(losses)


def test_runs_are_tagged_with_the_spec_name(tiny_search):
    # tiny_search runs search_spaces/tiny.yaml: tuner.py passes the spec's stem to callbacks(spec_name=...).
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        tags = list(read_wandb_run(run_dir)["run"].tags)
        assert "tiny" in tags, (f"run tags {tags} lack the spec name: tune_llama.tuner must call "
                                "tracking.callbacks(spec, name, spec_name=Path(SPEC).stem)")


def test_runs_are_written_into_the_search_folder_not_the_working_directory(tiny_search):
    # The fixture runs the search with cwd = the folder that holds the experiment.
    assert (tiny_search / "wandb").is_dir()
    assert not (tiny_search.parent / "wandb").exists()


def test_no_secret_reaches_a_wandb_file_a_config_or_the_search_log(tiny_search, fake_secrets):
    files = [p for p in (tiny_search / "wandb").rglob("*") if p.is_file()]
    files.append(tiny_search.parent / "search.log")
    assert len(files) > 6
    for path in files:
        data = path.read_bytes()
        for name, value in fake_secrets.items():
            assert value.encode() not in data, f"{name} leaked into {path}"
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        assert not [k for k in read_wandb_run(run_dir)["config"] if SECRET_NAME.search(k)]
