"""W&B settings without a search: offline without an API key, tags, the best values in a run's summary, values added
later, and no secret in a run's metadata or in what the scrubber lets through."""

from __future__ import annotations

import sys

import pytest

from conftest import read_wandb_run, wandb_run_closed
from tune_llama.redact import REDACTED, SECRET_NAME, scrub
from tune_llama.spec import Spec, WandbSpec
from tune_llama.tracking import TrialRunsCallback, add_run_summary, callbacks, wandb_mode


# ---------------------------------------------------------------- mode and secrets, without a search

def test_online_without_an_api_key_falls_back_to_offline_with_a_one_line_notice(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    spec = Spec(wandb=WandbSpec(mode="online", project="p"))
    assert wandb_mode(spec) == "offline"
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and notice.startswith("notice:") and "offline" in notice

    (callback,) = callbacks(spec, "search-name")
    capsys.readouterr()
    assert isinstance(callback, TrialRunsCallback) and callback.mode == "offline"
    callback.setup()  # Ray's own callback raises here without a key; offline needs none


def test_the_spec_name_is_a_tag_besides_the_specs_tags():
    spec = Spec(wandb=WandbSpec(mode="offline", tags=["lora", "tiny"]))
    (callback,) = callbacks(spec, "search-name", spec_name="tiny")
    assert callback.tags == ["lora", "tiny"] and callback.group == "search-name"
    (callback,) = callbacks(spec, "search-name", spec_name="sgd")
    assert callback.tags == ["lora", "tiny", "sgd"]


def test_the_summary_keeps_the_best_of_the_search_metric_too_when_it_is_not_eval_loss():
    callback = TrialRunsCallback(mode="offline", project="p", group="g", metric="eval_accuracy", metric_mode="max")
    callback.best_so_far("t", {"eval_loss": 2.0, "eval_accuracy": 0.1})
    best = callback.best_so_far("t", {"eval_loss": float("inf"), "eval_accuracy": 0.3})
    assert best == {"best_eval_loss": 2.0, "best_eval_accuracy": 0.3}
    assert callback.best_so_far("t", {"eval_loss": 1.5, "eval_accuracy": 0.2}) == {
        "best_eval_loss": 1.5, "best_eval_accuracy": 0.3}
    assert callback.best_so_far("other", {"eval_loss": 3.0}) == {"best_eval_loss": 3.0}


def test_values_added_later_reach_the_runs_summary_offline_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    experiment = tmp_path / "my-search"
    experiment.mkdir()
    add_run_summary(Spec(wandb=WandbSpec(mode="online", project="p")), experiment, "abc12345",
                    {"test_accuracy": 0.25, "test_examples": 200})
    (run_dir,) = (experiment / "wandb").glob("offline-run-*-abc12345")
    logged = read_wandb_run(wandb_run_closed(run_dir))
    assert logged["run"].run_id == "abc12345" and logged["run"].run_group == "my-search" and logged["run"].resume
    assert logged["summary"]["test_accuracy"] == 0.25 and logged["summary"]["test_examples"] == 200
    assert logged["closed"]


def test_a_secret_on_the_command_line_does_not_reach_the_runs_metadata(monkeypatch, tmp_path):
    secret = "hf_commandLINEsecret0123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(sys, "argv", ["tune-llama", "search", "--set", f"data.source=https://u:{secret}@host/x"])
    add_run_summary(Spec(wandb=WandbSpec(mode="offline", project="p")), tmp_path, "abc12345", {"x": 1})
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-abc12345")
    data = (wandb_run_closed(run_dir) / "run-abc12345.wandb").read_bytes()
    assert b"data.source=https://u:" in data, "W&B no longer records the command line: this test proves nothing"
    assert secret.encode() not in data
    assert sys.argv[-1].endswith(f"{secret}@host/x"), "the process's own argv must be left as it was"


def test_disabled_mode_adds_no_callback():
    assert callbacks(Spec(wandb=WandbSpec(mode="disabled")), "x") == []


def test_scrub_replaces_secret_values_and_credential_keys_but_not_ordinary_fields():
    secrets = ["hf_abcdefgh123"]
    raw = {"data": {"source": "https://user:hf_abcdefgh123@host/gsm8k", "tokens_per_s": 5.0},
           "model": {"tokenizer": "gpt2"}, "HF_TOKEN": "anything", "tags": ["x", "hf_abcdefgh123"]}
    clean = scrub(raw, secrets)
    assert clean["data"]["source"] == f"https://user:{REDACTED}@host/gsm8k"
    assert clean["HF_TOKEN"] == REDACTED and clean["tags"] == ["x", REDACTED]
    assert clean["data"]["tokens_per_s"] == 5.0 and clean["model"]["tokenizer"] == "gpt2"
    assert raw["HF_TOKEN"] == "anything", "scrub must not change its input"


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY"])
def test_credential_names_are_recognised(name):
    assert SECRET_NAME.search(name)
