"""The report: a table of every trial and PNG plots, for finished, running and interrupted searches."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from tune_llama.cli import run_cli
from tune_llama.__main__ import command
from tune_llama.report import param_importance, trial_rows, write_report
from tune_llama.driver import DriverLock
from tune_llama.results import RUNG_STOPPED, ERRORED, FINISHED, INTERRUPTED, RUNNING, load_search


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def reported(experiment: Path) -> dict[str, list[dict]]:
    out = {}
    for result in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


@pytest.fixture(scope="module")
def reported_search(tiny_search) -> tuple[Path, list[Path]]:
    return tiny_search, write_report(tiny_search)


def test_report_writes_valid_non_trivial_pngs_including_metric_against_lr(reported_search):
    import matplotlib.image

    experiment, written = reported_search
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == ["best_so_far.png", "eval_loss.png", "eval_loss_vs_lr.png", "eval_perplexity.png",
                    "parallel_coordinates.png", "param_importance.png"]
    html = (experiment / "report" / "report.html").read_text()
    # No outside link: outside the inlined images, whose base64 text can hold "http" by chance.
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html).replace("http-equiv", "")
    assert html.count("data:image/png;base64,") == len(pngs) and "http" not in outside_images
    for path in written:
        assert path.parent == experiment / "report"
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_SIGNATURE
            assert path.stat().st_size > 10_000
            height, width, _ = matplotlib.image.imread(path).shape
            assert height >= 300 and width >= 500


def test_table_lists_every_trial_with_its_status_epochs_and_best_loss(reported_search, capsys):
    experiment, _ = reported_search
    run_cli_ok(experiment)
    out = capsys.readouterr().out
    truth = reported(experiment)
    search = load_search(experiment)
    rows = {r["trial"]: r for r in trial_rows(search)}
    assert set(rows) == set(truth)
    max_epochs = search.spec.training.epochs
    for trial_id, epochs in truth.items():
        row = rows[trial_id]
        assert trial_id in out
        assert row["epochs"] == epochs[-1]["epoch"] and row["reports"] == len(epochs)
        assert row["best_eval_loss"] == min(e["eval_loss"] for e in epochs)
        assert row["status"] == (FINISHED if epochs[-1]["epoch"] == max_epochs else RUNG_STOPPED)
    assert RUNG_STOPPED in out and FINISHED in out
    losses = [r["best_eval_loss"] for r in trial_rows(search)]
    assert losses == sorted(losses), "best trial first"


def run_cli_ok(experiment: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(command("report"), [str(experiment)])
    assert exit_info.value.code == 0


def copy_search(experiment: Path, target: Path) -> Path:
    shutil.copytree(experiment, target, ignore=shutil.ignore_patterns("checkpoint_*", "wandb", "report", "export"))
    return target


def set_ray_status(experiment: Path, trial_id: str, status: str) -> None:
    (state_file,) = experiment.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] == trial_id:
            trial["status"] = status
            entry[0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))


def cut_to_first_epoch(trial_dir: Path, pid: int) -> None:
    """As a live trial's folder looks: one finished epoch and the next line half written."""
    first, second = (trial_dir / "result.json").read_text().splitlines()[:2]
    row = {**json.loads(first), "pid": pid, "hostname": socket.gethostname(), "done": False}
    (trial_dir / "result.json").write_text(json.dumps(row) + "\n" + second[: len(second) // 2])


def longest_trial(experiment: Path) -> tuple[str, Path]:
    trial_id, _ = max(reported(experiment).items(), key=lambda item: len(item[1]))
    (folder,) = [p.parent for p in experiment.glob(f"*{trial_id}*/result.json")]
    return trial_id, folder


def test_a_trial_still_running_is_reported_as_running(tiny_search, tmp_path):
    experiment = copy_search(tiny_search, tmp_path / "live")
    trial_id, folder = longest_trial(experiment)
    cut_to_first_epoch(folder, pid=os.getpid())  # a process that is alive
    set_ray_status(experiment, trial_id, "RUNNING")
    driver = DriverLock(experiment).take()  # this test process plays the search's driver
    try:
        rows = {r["trial"]: r for r in trial_rows(load_search(experiment))}
        assert rows[trial_id]["status"] == RUNNING and rows[trial_id]["epochs"] == 1
        assert {p.name for p in write_report(experiment)} >= {"trials.csv", "eval_loss.png", "report.html"}
    finally:
        driver.release()


def test_trials_of_a_search_whose_driver_is_gone_are_interrupted_not_running(tiny_search, tmp_path):
    experiment = copy_search(tiny_search, tmp_path / "driver-gone")
    trial_id, folder = longest_trial(experiment)
    cut_to_first_epoch(folder, pid=os.getpid())  # the trial's worker looks alive ...
    set_ray_status(experiment, trial_id, "RUNNING")
    (experiment / "driver.json").write_text(json.dumps({"pid": dead_pid(), "hostname": socket.gethostname()}))
    rows = {r["trial"]: r for r in trial_rows(load_search(experiment))}
    assert rows[trial_id]["status"] == INTERRUPTED  # ... but nothing drives the search any more


def test_a_search_killed_before_its_first_report_says_there_is_nothing_to_plot(tiny_search, tmp_path, capsys):
    experiment = tmp_path / "early"
    experiment.mkdir()
    shutil.copy(tiny_search / "tune_llama_spec.json", experiment)
    written = write_report(experiment)
    assert "nothing to plot yet" in capsys.readouterr().out
    assert not [p for p in written if p.suffix == ".png"]
    assert "Nothing to plot yet" in (experiment / "report" / "report.html").read_text()


def test_parameter_importance_comes_from_the_searchs_optuna_study(tiny_search):
    importance = param_importance(load_search(tiny_search))
    assert set(importance) == {"training.lr", "training.gradient_accumulation_steps", "training.optimizer"}
    assert sum(importance.values()) == pytest.approx(1.0, abs=1e-6)


def test_the_optuna_study_holds_every_report_as_an_intermediate_value(tiny_search):
    import optuna
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tiny_search / 'optuna.db'}")
    truth = sorted(len(rows) for rows in reported(tiny_search).values())
    assert sorted(len(t.intermediate_values) for t in study.trials) == truth


def test_an_interrupted_search_without_ray_state_still_reports(tiny_search, tmp_path, capsys):
    experiment = copy_search(tiny_search, tmp_path / "killed")
    trial_id, folder = longest_trial(experiment)
    cut_to_first_epoch(folder, pid=dead_pid())
    set_ray_status(experiment, trial_id, "RUNNING")  # Ray's last word before the kill
    assert {r["trial"]: r for r in trial_rows(load_search(experiment))}[trial_id]["status"] == INTERRUPTED

    for state in experiment.glob("experiment_state-*.json"):
        state.unlink()  # killed before Ray wrote its state at all
    run_cli_ok(experiment)
    out = capsys.readouterr().out
    assert all(t in out for t in reported(tiny_search))
    assert (experiment / "report" / "eval_loss.png").stat().st_size > 10_000


def test_a_trial_ray_marked_as_errored_is_reported_as_errored(tiny_search, tmp_path, capsys):
    experiment = copy_search(tiny_search, tmp_path / "failed")
    trial_id, _ = longest_trial(experiment)
    set_ray_status(experiment, trial_id, "ERROR")
    rows = {r["trial"]: r for r in trial_rows(load_search(experiment))}
    assert rows[trial_id]["status"] == ERRORED


def dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_importance_from_fewer_than_8_trials_is_said_to_be_indicative_only(reported_search, capsys):
    experiment, _ = reported_search
    assert param_importance(load_search(experiment)).trials < 8  # tiny.yaml: 6 trials
    run_cli_ok(experiment)
    assert "parameter importance (Optuna PED-ANOVA, 6 trials) (few trials: indicative only):" in capsys.readouterr().out
    assert "Parameter importance (few trials: indicative only)</h2>" in (experiment / "report" / "report.html").read_text()


def test_figure_captions_are_words_not_file_names(reported_search):
    import re
    experiment, written = reported_search
    html = (experiment / "report" / "report.html").read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert len(captions) == len([p for p in written if p.suffix == ".png"])
    stems = {p.stem for p in written if p.suffix == ".png"}
    assert not [c for c in captions if c in stems or ".png" in c or c.replace(" ", "_") in stems], captions
    assert "Validation loss per report, one line per trial" in captions


def test_the_curves_legend_sits_under_the_axes_never_over_a_curve(tiny_search):
    from tune_llama.plots import curves_figure
    fig = curves_figure(load_search(tiny_search), "eval_loss")
    fig.canvas.draw()
    (ax,) = fig.axes
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 <= axes.y0, "the legend overlaps the plotting area"


def test_the_saved_curves_keep_the_figures_width_for_the_axes_and_grow_taller_for_the_legend(tiny_search,
                                                                                               tmp_path):
    from matplotlib.image import imread

    from tune_llama.plots import curves_figure, save
    fig = curves_figure(load_search(tiny_search), "eval_loss")
    width_px, height_px = fig.get_figwidth() * fig.dpi, fig.get_figheight() * fig.dpi
    (ax,) = fig.axes
    image = imread(save(fig, tmp_path / "curves.png"))
    assert ax.get_position().width > 0.75, f"the legend squeezed the axes to {ax.get_position().width:.0%}"
    assert image.shape[0] > height_px, "the saved image cut the legend off"
    assert image.shape[1] <= width_px, "wider than the figure: the report would shrink it"


def test_over_length_counts_are_in_each_trials_first_report_and_in_the_report(reported_search, capsys):
    from tune_llama.loop import DATA_COUNTS
    experiment, _ = reported_search
    for rows in reported(experiment).values():
        assert set(DATA_COUNTS) <= set(rows[0]) and not set(DATA_COUNTS) & set(rows[-1] if len(rows) > 1 else {})
    run_cli_ok(experiment)
    line = ("examples over data.max_length=512 (data.overlong=truncate): train 0 truncated, 0 dropped; "
            "validation 0 truncated, 0 dropped")
    assert line in capsys.readouterr().out
    assert line in (experiment / "report" / "report.html").read_text()
    assert "train_truncated" in (experiment / "report" / "trials.csv").read_text().splitlines()[0]


def test_report_files_are_readable_by_the_group_under_umask_0022(tiny_search, tmp_path):
    import stat
    experiment = copy_search(tiny_search, tmp_path / "shared")
    old = os.umask(0o022)
    try:
        write_report(experiment)
    finally:
        os.umask(old)
    out = experiment / "report"
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [out, *out.iterdir()]
            if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)} == {}
