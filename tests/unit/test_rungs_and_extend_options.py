"""The halving scheduler's rungs and default, and the options that extend a search (``--more``,
``search.warm_start``) refused in one line before anything is written."""

from __future__ import annotations

import pytest

from conftest import TINY, one_line_error
from tune_llama.__main__ import command
from tune_llama.budget import halving_rungs
from tune_llama.spec import load_spec
from tune_llama.warm_start import misfit


def search_error(capsys, argv: list[str]) -> str:
    return one_line_error(command("search"), argv, capsys)


# ---------------------------------------------------------------- the halving scheduler

def rungs(grace: float, factor: int, epochs: int) -> list[float]:
    spec = load_spec(TINY, [f"search.asha.grace_period={grace}", f"search.asha.reduction_factor={factor}",
                            f"training.epochs={epochs}"])
    return [epoch for epoch, _ in halving_rungs(spec)]


def test_rungs_are_the_grace_period_times_powers_of_the_reduction_factor_below_max_t():
    assert rungs(0.25, 4, 4) == [0.25, 1.0]
    assert rungs(1, 2, 4) == [1, 2]
    assert rungs(4, 2, 4) == []


def test_the_default_scheduler_is_halving_and_asha_is_on_request():
    assert load_spec(TINY).search.scheduler == "halving"
    assert load_spec(TINY, ["search.scheduler=asha"]).search.scheduler == "asha"


@pytest.mark.parametrize("count", ["0", "-3"])
def test_more_with_no_or_a_negative_count_is_one_line_naming_the_option(capsys, tmp_path, count):
    err = search_error(capsys, ["--resume", str(tmp_path), "--more", count])
    assert "--more" in err and count in err


def test_more_without_resume_is_rejected(capsys, tmp_path):
    err = search_error(capsys, [str(TINY), "--storage", str(tmp_path), "--more", "2"])
    assert "--more" in err and "--resume" in err
    assert not list(tmp_path.iterdir())


def test_more_on_a_folder_that_is_not_a_search_is_rejected(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a search")
    err = search_error(capsys, ["--resume", str(tmp_path), "--more", "2"])
    assert "not a tune-llama search" in err


# ---------------------------------------------------------------- warm start

def test_a_config_fits_a_space_only_with_the_same_fields_and_values_inside_each_distribution():
    space = {"training.lr": {"loguniform": [1e-4, 1e-2]}, "training.optimizer": {"choice": ["sgd", "adamw"]}}
    assert misfit({"training.lr": 1e-3, "training.optimizer": "sgd"}, space) is None
    assert "training.lr=0.05 outside" in misfit({"training.lr": 0.05, "training.optimizer": "sgd"}, space)
    assert "not one of" in misfit({"training.lr": 1e-3, "training.optimizer": "lion"}, space)
    assert "lacks training.optimizer" in misfit({"training.lr": 1e-3}, space)
    assert "training.seed, not searched now" in misfit({"training.lr": 1e-3, "training.optimizer": "sgd",
                                                        "training.seed": 1}, space)


def test_a_warm_start_folder_that_is_not_a_search_is_one_line_before_anything_is_written(capsys, tmp_path):
    (tmp_path / "old").mkdir()
    err = search_error(capsys, [str(TINY), "--storage", str(tmp_path / "new"),
                                "--set", f"search.warm_start={tmp_path / 'old'}"])
    assert "search.warm_start" in err and "not a tune-llama search folder" in err
    assert not (tmp_path / "new").exists()
