"""The Ray Tune search: real Ray, real Optuna, on CPU."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, kill_session, one_line_error, result_rows, run_search, wait_until
from tune_llama.__main__ import command
from tune_llama.summary import EXIT_INTERRUPTED, write_summary


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "params.json").exists())


def epochs_reported(trial: Path) -> list[dict]:
    return result_rows(trial.parent).get(trial.name, [])


# ---------------------------------------------------------------- a finished search

def test_tiny_search_runs_every_trial_and_asha_stops_some_early(tiny_search):
    trials = trial_dirs(tiny_search)
    assert len(trials) == 6
    epochs_run = [len(epochs_reported(t)) for t in trials]
    assert all(n >= 1 for n in epochs_run)
    assert max(epochs_run) == 4, "some trial must reach max_t = training.epochs"
    assert min(epochs_run) < 4, f"ASHA stopped no trial early: {epochs_run}"


def test_one_trial_at_a_time_runs_every_trial_in_the_first_trials_process(tiny_search):
    # Tune's reuse_actors: a new trial starts in the process an ended (finished or rung-stopped) trial left,
    # not in a new interpreter that imports torch and builds its context again.
    pids = {trial.name: {r["pid"] for r in epochs_reported(trial)} for trial in trial_dirs(tiny_search)}
    assert len(pids) == 6 and len(set().union(*pids.values())) == 1, pids


def test_the_summary_export_report_and_single_run_name_the_same_best_trial_report_and_checkpoint(tiny_search):
    """One ranking: the best report is not always a trial's last one, and all four readers agree on it."""
    from tune_llama.export import choose
    from tune_llama.report import trial_rows
    from tune_llama.results import load_search
    from tune_llama.train import training_summary

    search_ = load_search(tiny_search)
    trial, row = search_.best()
    rows = [r for rs in result_rows(tiny_search).values() for r in rs]
    independent = min(rows, key=lambda r: r["eval_loss"])
    assert (trial.trial_id, row["step"]) == (independent["trial_id"], independent["step"])
    choice = choose(search_)
    assert (choice.trial.trial_id, choice.row["step"]) == (trial.trial_id, row["step"])
    assert choice.checkpoint.name == row["checkpoint_dir_name"]
    assert trial_rows(search_)[0]["trial"] == trial.trial_id
    assert f"best trial: {trial.trial_id}" in (tiny_search / "summary.txt").read_text()
    assert str(choice.checkpoint) in (tiny_search / "summary.txt").read_text()
    single = training_summary(trial.rows, "completed", "eval_loss", "min")
    assert (single["best_report"], single["best_step"]) == (row["report"], row["step"])


def test_every_trial_reported_eval_loss_and_perplexity_each_epoch(tiny_search):
    for trial in trial_dirs(tiny_search):
        rows = epochs_reported(trial)
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        assert [r["report"] for r in rows] == list(range(1, len(rows) + 1))
        for row in rows:
            assert row["eval_loss"] > 0 and row["eval_perplexity"] == pytest.approx(2.718281828 ** row["eval_loss"])


def test_optuna_study_is_kept_in_sqlite_inside_the_experiment(tiny_search):
    import optuna
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tiny_search / 'optuna.db'}")
    assert len(study.trials) == 6
    assert {"training.lr", "training.optimizer", "training.gradient_accumulation_steps"} <= set(study.trials[0].params)


def test_search_prints_the_best_trial_and_next_commands(tiny_search):
    out = (tiny_search / "summary.txt").read_text()
    assert "best trial:" in out and "eval_loss" in out
    for hint in ("tune-llama export", "tune-llama report"):
        assert hint in out
    assert "--resume" not in out, "a finished search has nothing to resume"


def test_kept_checkpoints_are_the_best_by_the_metric_plus_the_latest(tmp_path):
    # mode=max makes the *worst* (earliest) epochs "best", so keeping by score and keeping
    # the most recent give different folders: the test can tell them apart.
    proc = run_search([str(TINY), "--name", "keep", "--storage", str(tmp_path),
                       "--set", "search.num_samples=1", "--set", "search.mode=max",
                       "--set", "search.keep_checkpoints=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (trial,) = trial_dirs(tmp_path / "keep")
    rows = epochs_reported(trial)
    assert len(rows) == 4
    by_score = sorted(rows, key=lambda r: r["eval_loss"], reverse=True)[:2]
    expected = {r["checkpoint_dir_name"] for r in by_score} | {rows[-1]["checkpoint_dir_name"]}
    kept = {p.name for p in trial.glob("checkpoint_*")}
    assert kept == expected


# ---------------------------------------------------------------- kill and resume

def test_a_killed_search_resumes_to_exactly_num_samples_without_restarting_checkpointed_trials(tmp_path):
    experiment = tmp_path / "killed"
    leader = subprocess.Popen(
        [sys.executable, "-m", "tune_llama.search", str(TINY), "--name", "killed", "--storage", str(tmp_path),
         "--set", "search.max_concurrent=2", "--set", "search.num_samples=4"],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed once Ray's copy in the search folder holds two reports of a trial: the experiment state saved
    # with that copy knows the trial's first checkpoint at least (checkpoints alone can precede any state).
    try:
        wait_until(lambda: any(len(rows) >= 2 for rows in result_rows(experiment).values()), leader,
                   "a trial's second report", timeout=600)
    finally:
        kill_session(leader)
    checkpointed = {name for name, rows in result_rows(experiment).items() if len(rows) >= 2}
    assert checkpointed

    proc = run_search(["--resume", str(experiment)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = trial_dirs(experiment)
    assert len(trials) == 4
    for trial in trials:
        epochs = [r["epoch"] for r in epochs_reported(trial)]
        assert epochs and epochs[-1] >= 1
        if trial.name in checkpointed:
            assert epochs.count(1) == 1, f"{trial.name} restarted from epoch 1: {epochs}"


def search_error(capsys, argv: list[str]) -> str:
    return one_line_error(command("search"), argv, capsys)


def test_a_space_key_that_is_not_a_field_is_rejected_before_ray_starts(capsys, tmp_path):
    err = search_error(capsys, [str(TINY), "--storage", str(tmp_path),
                                  "--set", "search.space={training.learning_rate: {uniform: [0.1, 0.2]}}"])
    assert "search.space.training.learning_rate" in err
    assert not list(tmp_path.iterdir())
    assert not search_started_ray()


def test_an_empty_space_is_rejected_before_ray_starts(capsys, tmp_path):
    err = search_error(capsys, [str(TINY), "--storage", str(tmp_path), "--set", "search.space={}"])
    assert "search.space" in err
    assert not search_started_ray()


def test_resume_of_a_missing_folder_is_rejected(capsys, tmp_path):
    err = search_error(capsys, ["--resume", str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in err
    assert not search_started_ray()


def search_started_ray() -> bool:
    import ray
    return ray.is_initialized()


# ---------------------------------------------------------------- finalists

def test_finalists_are_scored_on_gsm8k_accuracy_and_export_follows_their_winner(tmp_path):
    from tune_llama.export import EXPORT_FILE, export
    from tune_llama.paired import paired_difference
    from tune_llama.report import write_report
    from tune_llama.results import load_search

    proc = run_search([str(TINY), "--name", "fin", "--storage", str(tmp_path), "--set", "search.num_samples=3",
                       "--set", "training.epochs=2", "--set", "search.finalists.top_k=2",
                       "--set", "search.finalists.limit=4", "--set", "search.finalists.max_new_tokens=8",
                       "--set", "search.finalists.seeds=[1]"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    experiment = tmp_path / "fin"
    record = json.loads((experiment / "finalists.json").read_text())
    ranked = [t.trial_id for t, _ in load_search(experiment).ranked()]
    assert [f["trial_id"] for f in record["finalists"]] == ranked[:2], "the top 2 by validation loss"
    for entry in record["finalists"]:
        assert entry["n"] == 4 and 0 <= entry["strict_accuracy"] <= 1
        assert entry["strict_ci95"][0] <= entry["strict_accuracy"] <= entry["strict_ci95"][1]
        assert [s["seed"] for s in entry["scores"]] == [None, 1], "the checkpoint, then retrained with seed 1"
        assert entry["strict_accuracy"] == pytest.approx(sum(s["strict"]["accuracy"] for s in entry["scores"]) / 2)
        assert all(len(s["strict"]["per_problem"]) == 4 for s in entry["scores"])
    best, second = sorted(record["finalists"], key=lambda e: (-e["strict_accuracy"], e["eval_loss"]))
    assert record["winner"]["trial_id"] == best["trial_id"]
    comparison = record["comparison"]
    assert (comparison["winner"], comparison["runner_up"]) == (best["trial_id"], second["trial_id"])
    paired = paired_difference(best["scores"][0]["strict"]["per_problem"], second["scores"][0]["strict"]["per_problem"])
    assert {k: comparison[k] for k in paired} == paired and comparison["over_seeds"]["seeds"] == 2
    assert comparison["sentence"] in proc.stdout, "the search prints it"
    write_report(experiment)
    assert html.escape(comparison["sentence"]) in (experiment / "report" / "report.html").read_text()
    assert "finalists" in (experiment / "summary.txt").read_text()

    info = json.loads((export(experiment, tmp_path / "by-finalists") / EXPORT_FILE).read_text())
    assert info["trial_id"] == record["winner"]["trial_id"] and "finalists" in info["reason"]
    by_loss = json.loads((export(experiment, tmp_path / "by-loss", by="loss") / EXPORT_FILE).read_text())
    assert by_loss["trial_id"] == ranked[0]


# ---------------------------------------------------------------- one account of an interrupted search

def interrupted_copy(tiny_search: Path, target: Path, keep_first_checkpoint: bool) -> Path:
    """``tiny_search`` as an interrupt leaves it: no report row reached ``result.json``, no Ray state was
    saved, the driver is gone; with ``keep_first_checkpoint`` each trial's oldest checkpoint (weights and
    ``metrics.json``) had been copied, else none."""
    import shutil
    shutil.copytree(tiny_search, target, ignore=shutil.ignore_patterns("wandb", "report", "export", "summary.txt",
                                                                       "experiment_state-*", ".last-good-state"))
    for trial in trial_dirs(target):
        (trial / "result.json").write_text("")
        checkpoints = sorted(trial.glob("checkpoint_*"))
        for folder in checkpoints[1:] if keep_first_checkpoint else checkpoints:
            shutil.rmtree(folder)
    (target / "driver.json").write_text(json.dumps({"pid": -1, "hostname": "gone"}))
    return target


def test_interrupted_before_the_first_report_summary_report_and_export_all_say_nothing_yet(tiny_search, tmp_path,
                                                                                            capsys):
    from tune_llama.errors import UserError
    from tune_llama.export import choose
    from tune_llama.report import write_report
    from tune_llama.results import load_search
    experiment = interrupted_copy(tiny_search, tmp_path / "early", keep_first_checkpoint=False)
    assert write_summary(experiment) == EXIT_INTERRUPTED
    summary = (experiment / "summary.txt").read_text()
    assert "no trial reported a finite eval_loss yet" in summary
    assert "tune-llama export" not in summary, "nothing to export: the hint must not suggest it"
    assert "tune-llama search --resume" in summary
    capsys.readouterr()
    write_report(experiment)
    assert "nothing to plot yet" in capsys.readouterr().out
    with pytest.raises(UserError, match="nothing to export"):
        choose(load_search(experiment), by="loss")


def test_a_checkpoint_whose_report_row_was_lost_counts_as_that_report_for_summary_report_and_export(tiny_search,
                                                                                                  tmp_path, capsys):
    from tune_llama.checkpoint import read_metrics
    from tune_llama.export import choose
    from tune_llama.report import trial_rows, write_report
    from tune_llama.results import load_search
    experiment = interrupted_copy(tiny_search, tmp_path / "after-first", keep_first_checkpoint=True)
    kept = {folder.parent: read_metrics(folder) for folder in experiment.glob("*/checkpoint_*")}
    assert kept and all(kept.values())
    truth_folder, truth = min(kept.items(), key=lambda item: item[1]["eval_loss"])

    assert write_summary(experiment) == EXIT_INTERRUPTED
    summary = (experiment / "summary.txt").read_text()
    chosen = choose(load_search(experiment), by="loss")
    best_row = trial_rows(load_search(experiment))[0]
    assert chosen.trial.path == truth_folder and chosen.row["report"] == truth["report"]
    assert f"best trial: {chosen.trial.trial_id}" in summary and f"best report: {truth['report']} " in summary
    assert best_row["trial"] == chosen.trial.trial_id and best_row["best_eval_loss"] == truth["eval_loss"]
    assert "tune-llama export" in summary and "tune-llama search --resume" in summary
    capsys.readouterr()
    assert "eval_loss.png" in {p.name for p in write_report(experiment)}
