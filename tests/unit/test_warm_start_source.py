"""A warm-started search's summary and report give its source's best beside its own, and what the source's
best config came to here: a warm start can end worse than where it started from."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY
from tune_llama.results import SPEC_FILE, load_search
from tune_llama.spec import load_spec
from tune_llama.summary import summary_lines, warm_start_line

LR = "training.lr"


def write_search(folder: Path, trials: dict[str, tuple[float, list[float]]], overrides: list[str]) -> Path:
    """A finished search of 2-epoch trials on disk, as Tune leaves it: trial id -> (its lr, its eval_loss at each
    epoch; one epoch: the scheduler stopped it at the rung)."""
    spec = load_spec(TINY, ["training.epochs=2", *overrides])
    spec.search.space = {LR: {"loguniform": [1e-4, 3e-2]}}
    folder.mkdir(parents=True)
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    for number, (trial_id, (lr, losses)) in enumerate(trials.items(), 1):
        trial = folder / f"train_trial_{trial_id}_{number}_lr={lr}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({LR: lr}))
        (trial / "result.json").write_text("".join(json.dumps(
            {"trial_id": trial_id, "step": epoch, "report": epoch, "epoch": float(epoch), "eval_loss": loss,
             "eval_perplexity": 2.0, "status": "completed" if epoch == 2 else "running",
             "done": epoch == len(losses)}) + "\n"
            for epoch, loss in enumerate(losses, 1)))
    return folder


def test_a_warm_start_that_ends_worse_than_its_source_says_so_and_what_its_best_config_did_here(tmp_path):
    old = write_search(tmp_path / "old", {"aaaa": (0.003, [1.5, 1.2]), "bbbb": (0.01, [1.6, 1.4])}, [])
    new = write_search(tmp_path / "new", {"cccc": (0.003, [1.9]), "dddd": (0.02, [1.45, 1.3])},
                       [f"search.warm_start={old}"])
    line = warm_start_line(load_search(new))
    assert line == ("warm start: this search's best eval_loss 1.3000 is worse than its source's, old's eval_loss "
                    "1.2000 (trial aaaa); that config ran here as trial cccc: stopped at rung at epoch 1, best 1.9000")
    assert line in summary_lines(load_search(new))[0]


def test_a_warm_start_that_beats_its_source_says_so(tmp_path):
    old = write_search(tmp_path / "old", {"aaaa": (0.003, [1.5, 1.2])}, [])
    new = write_search(tmp_path / "new", {"cccc": (0.003, [1.5, 1.2]), "dddd": (0.02, [1.3, 1.1])},
                       [f"search.warm_start={old}"])
    assert warm_start_line(load_search(new)).startswith("warm start: this search's best eval_loss 1.1000 is better "
                                                        "than its source's, old's eval_loss 1.2000 (trial aaaa)")


def test_a_search_without_warm_start_has_no_such_line(tmp_path):
    search = load_search(write_search(tmp_path / "s", {"aaaa": (0.003, [1.5, 1.2])}, []))
    assert warm_start_line(search) is None
    assert not [line for line in summary_lines(search)[0] if line.startswith("warm start")]
