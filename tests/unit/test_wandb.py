"""W&B tracking of a search: one offline run per trial inside the search folder, no secrets anywhere."""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path

import pytest

from tune_llama.redact import REDACTED, SECRET_NAME, scrub
from tune_llama.spec import Spec, WandbSpec
from tune_llama.tracking import TrialRunsCallback, add_run_summary, callbacks, wandb_mode


# ---------------------------------------------------------------- reading offline runs

def wandb_records(path: Path):
    """The protobuf records of a ``run-ID.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += 7
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(run_dir: Path) -> dict:
    """An offline run as W&B wrote it: the run record, config, history rows, summary, whether it was closed.

    Offline W&B (0.31) writes no ``files/config.yaml`` or ``files/wandb-summary.json``: everything is in
    ``run-ID.wandb``, a log of protobuf records (the summary as a series of updates, the last one wins).
    """
    (log,) = run_dir.glob("run-*.wandb")
    run, config, history, summary, closed = None, {}, [], {}, False
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item_key(u): json.loads(u.value_json) for u in run.config.update})
        elif kind == "config":
            config.update({item_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary.update({item_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "exit":
            closed = True
    assert run is not None, f"{log} holds no run record"
    config.pop("_wandb", None)  # W&B's own bookkeeping
    return {"run": run, "config": config, "history": history, "summary": summary, "closed": closed}


def wait_until_closed(run_dir: Path, timeout_s: float = 30.0) -> Path:
    """``run.finish()`` returns before W&B's service has written the run's last records (they reach the file
    within a second, or at the latest when the process exits): wait for the exit record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = list(run_dir.glob("run-*.wandb"))
        if logs and any(r.WhichOneof("record_type") == "exit" for r in wandb_records(logs[0])):
            return run_dir
        time.sleep(0.2)
    raise AssertionError(f"{run_dir}: no exit record {timeout_s:.0f} s after the run was finished")


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # newer W&B versions fill nested_key only


def reported_epochs(experiment: Path) -> dict[str, list[int]]:
    """Trial id -> epochs in its result.json."""
    out = {}
    for result in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = [r["epoch"] for r in rows]
    return out


# ---------------------------------------------------------------- the shared search

@pytest.mark.integration
def test_every_trial_has_one_offline_run_in_the_search_folder_with_every_epoch(tiny_search):
    epochs = reported_epochs(tiny_search)
    run_dirs = sorted((tiny_search / "wandb").glob("offline-run-*"))
    runs = {d.name.rsplit("-", 1)[1]: read_run(d) for d in run_dirs}
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


@pytest.mark.integration
def test_each_run_config_is_the_whole_resolved_spec_flat_with_numbers_kept_numbers(tiny_search):
    from tune_llama.results import load_search
    search = load_search(tiny_search)
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        logged = read_run(run_dir)
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


@pytest.mark.integration
def test_the_history_holds_the_trials_metrics_not_rays_bookkeeping(tiny_search):
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        history = read_run(run_dir)["history"]
        assert history and not {k for row in history for k in row} & RAY_KEYS


@pytest.mark.integration
def test_each_runs_final_status_is_the_trials_state_in_the_words_of_results(tiny_search):
    from tune_llama.results import RUNG_STOPPED, load_search
    search = load_search(tiny_search)
    states = {t.trial_id: search.status(t) for t in search.trials}
    logged = {read_run(d)["run"].run_id: read_run(d)["summary"]["status"]
              for d in (tiny_search / "wandb").glob("offline-run-*")}
    assert logged == states and RUNG_STOPPED in logged.values()


@pytest.mark.integration
def test_each_run_logs_every_report_and_keeps_the_best_eval_loss_in_its_summary(tiny_search):
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        logged = read_run(run_dir)
        for row in logged["history"]:
            assert {"epoch", "train_loss", "eval_loss", "eval_perplexity", "tokens_per_s"} <= set(row)
            assert all(isinstance(v, (int, float)) for v in row.values()), f"a non-number logged as a metric: {row}"
        summary = logged["summary"]
        losses = [h["eval_loss"] for h in logged["history"] if math.isfinite(h["eval_loss"])]
        assert isinstance(summary["best_eval_loss"], float) and summary["best_eval_loss"] == min(losses)


@pytest.mark.integration
def test_runs_are_tagged_with_the_spec_name(tiny_search):
    # tiny_search runs search_spaces/tiny.yaml: tuner.py passes the spec's stem to callbacks(spec_name=...).
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        tags = list(read_run(run_dir)["run"].tags)
        assert "tiny" in tags, (f"run tags {tags} lack the spec name: tune_llama.tuner must call "
                                "tracking.callbacks(spec, name, spec_name=Path(SPEC).stem)")


@pytest.mark.integration
def test_runs_are_written_into_the_search_folder_not_the_working_directory(tiny_search):
    # The fixture runs the search with cwd = the folder that holds the experiment.
    assert (tiny_search / "wandb").is_dir()
    assert not (tiny_search.parent / "wandb").exists()


@pytest.mark.integration
def test_no_secret_reaches_a_wandb_file_a_config_or_the_search_log(tiny_search, fake_secrets):
    files = [p for p in (tiny_search / "wandb").rglob("*") if p.is_file()]
    files.append(tiny_search.parent / "search.log")
    assert len(files) > 6
    for path in files:
        data = path.read_bytes()
        for name, value in fake_secrets.items():
            assert value.encode() not in data, f"{name} leaked into {path}"
    for run_dir in (tiny_search / "wandb").glob("offline-run-*"):
        assert not [k for k in read_run(run_dir)["config"] if SECRET_NAME.search(k)]


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
    logged = read_run(wait_until_closed(run_dir))
    assert logged["run"].run_id == "abc12345" and logged["run"].run_group == "my-search" and logged["run"].resume
    assert logged["summary"]["test_accuracy"] == 0.25 and logged["summary"]["test_examples"] == 200
    assert logged["closed"]


def test_a_secret_on_the_command_line_does_not_reach_the_runs_metadata(monkeypatch, tmp_path):
    secret = "hf_commandLINEsecret0123"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(sys, "argv", ["tune-llama", "search", "--set", f"data.source=https://u:{secret}@host/x"])
    add_run_summary(Spec(wandb=WandbSpec(mode="offline", project="p")), tmp_path, "abc12345", {"x": 1})
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-abc12345")
    data = (wait_until_closed(run_dir) / "run-abc12345.wandb").read_bytes()
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
