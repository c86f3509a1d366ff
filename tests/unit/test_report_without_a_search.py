"""The report's checks that need no search: a folder that is not a search is a one-line error, and parameter
importance from 8 trials or more carries no caveat."""

from __future__ import annotations

from conftest import one_line_error
from tune_llama.__main__ import command


def test_report_of_a_folder_that_is_not_a_search_is_a_one_line_error(tmp_path, capsys):
    assert "not a tune-llama search folder" in one_line_error(command("report"), [str(tmp_path)], capsys)


def test_importance_from_8_trials_or_more_carries_no_caveat():
    from tune_llama.plots import Importance
    assert Importance({"training.lr": 1.0}, 8).caveat == "" and Importance({}, 7).caveat
