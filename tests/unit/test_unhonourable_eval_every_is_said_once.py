"""A training.eval_every that an epoch's optimizer steps cannot honour is said once per cause at preflight;
one every epoch can honour says nothing."""

from __future__ import annotations

from conftest import TINY
from tune_llama.spec import load_spec


def test_an_eval_every_that_an_epoch_cannot_honour_is_said_once_per_cause_at_preflight(capsys):
    from tune_llama.preflight import preflight
    # 16 train problems in batches of 8: accumulation 1 gives 2 optimizer steps per epoch, 2 gives 1.
    spec = load_spec(TINY, ["data.synthetic_size=24", "data.val_size=8", "training.eval_every=0.5",
                            "search.space={data.batch_size: {choice: [4, 8]}, "
                            "training.gradient_accumulation_steps: {choice: [1, 2]}}"])
    preflight(spec)
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["note: trials with data.batch_size=8, training.gradient_accumulation_steps=2 have 1 optimizer "
                     "step per epoch; they report once per epoch, not the 2 times training.eval_every=0.5 asks for"]


def test_a_single_run_whose_epoch_has_too_few_steps_is_told_so_once(capsys, tmp_path):
    from tune_llama.preflight import preflight
    preflight(load_spec(TINY, ["data.synthetic_size=32", "data.val_size=8", "training.eval_every=0.25",
                               "search.space={}"]))
    assert capsys.readouterr().err.strip() == ("note: each trial has 3 optimizer steps per epoch; it reports 3 times "
                                               "per epoch, not the 4 times training.eval_every=0.25 asks for")


def test_an_eval_every_every_epoch_can_honour_says_nothing(capsys):
    from tune_llama.preflight import preflight
    preflight(load_spec(TINY, ["training.eval_every=0.5"]))
    assert "note:" not in capsys.readouterr().err
