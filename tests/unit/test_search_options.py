"""The search's choices that need no Ray: ranking by the best report, the sampler (TPE by default, random on
request, both seeded), and bad input refused in one line."""

from __future__ import annotations

from conftest import TINY, one_line_error
from tune_llama.__main__ import command


def test_ranking_by_the_best_report_can_pick_a_trial_whose_last_report_is_worse():
    from tune_llama.results import Trial, rank
    falls_then_rises = Trial("a", None, {}, [{"step": 1, "eval_loss": 2.0}, {"step": 2, "eval_loss": 1.0},
                                            {"step": 3, "eval_loss": 3.0}])
    steady = Trial("b", None, {}, [{"step": 1, "eval_loss": 1.5}, {"step": 2, "eval_loss": 1.2}])
    ranked = rank([falls_then_rises, steady], "eval_loss", "min", row=lambda t: t.best("eval_loss", "min"))
    assert [t.trial_id for t in ranked] == ["a", "b"]
    assert falls_then_rises.best("eval_loss", "min")["step"] == 2
    assert [t.trial_id for t in rank([falls_then_rises, steady], "eval_loss", "max",
                                      row=lambda t: t.best("eval_loss", "max"))] == ["a", "b"]


def test_the_sampler_is_tpe_by_default_and_random_on_request_both_seeded():
    import optuna
    from tune_llama import tuner
    from tune_llama.spec import load_spec

    def draws(spec) -> list[float]:
        study = optuna.create_study(sampler=tuner.sampler(spec))
        return [study.ask().suggest_float("lr", 1e-5, 1e-2, log=True) for _ in range(3)]

    tpe, rand = load_spec(TINY), load_spec(TINY, ["search.sampler=random", "search.seed=7"])
    assert isinstance(tuner.sampler(tpe), optuna.samplers.TPESampler)
    assert isinstance(tuner.sampler(rand), optuna.samplers.RandomSampler)
    assert draws(rand) == draws(rand) != draws(load_spec(TINY, ["search.sampler=random", "search.seed=8"]))


# ---------------------------------------------------------------- bad input, before Ray starts

def search_error(capsys, argv: list[str]) -> str:
    return one_line_error(command("search"), argv, capsys)


def test_resume_of_a_folder_that_is_not_a_search_is_rejected(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a search")
    err = search_error(capsys, ["--resume", str(tmp_path)])
    assert "not a tune-llama search" in err


def test_a_bad_distribution_names_its_field(capsys, tmp_path):
    err = search_error(capsys, [str(TINY), "--storage", str(tmp_path),
                                  "--set", "search.space={training.lr: {loguniform: [0, 1]}}"])
    assert "search.space.training.lr.loguniform" in err
