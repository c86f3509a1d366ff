"""Export of a search's best trial: a plain Hugging Face directory that reproduces the reported loss."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import one_line_error as cli_error
from tune_llama.__main__ import command
from tune_llama.export import EXPORT_FILE, export
from tune_llama.export import choose
from tune_llama.results import load_search


@pytest.fixture(scope="module")
def exported(tiny_search, fake_secrets, tmp_path_factory) -> Path:
    """The best model of ``tiny_search``, exported with the fake secrets in the environment."""
    saved = dict(os.environ)
    os.environ.update(fake_secrets)
    try:
        return export(tiny_search, tmp_path_factory.mktemp("export") / "model")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def best_reported(experiment: Path) -> tuple[str, dict]:
    """(trial id, report row) with the lowest eval_loss in any trial's result.json: read independently."""
    best = None
    for result in experiment.glob("*/result.json"):
        for line in result.read_text().splitlines():
            row = json.loads(line)
            if best is None or row["eval_loss"] < best[1]["eval_loss"]:
                best = (row["trial_id"], row)
    assert best is not None
    return best


def test_export_picks_the_best_report_of_any_trial_and_records_it(tiny_search, exported):
    trial_id, row = best_reported(tiny_search)
    info = json.loads((exported / EXPORT_FILE).read_text())
    assert info["trial_id"] == trial_id
    assert (info["epoch"], info["step"], info["report"]) == (row["epoch"], row["step"], row["report"])
    assert info["metrics"]["eval_loss"] == row["eval_loss"]
    assert info["params"] == row["config"]
    assert info["spec"]["training"]["lr"] == row["config"]["training.lr"]  # the trial's spec, params applied
    assert {"torch", "transformers", "python"} <= set(info["versions"])


def test_exported_model_loads_with_plain_transformers_and_reproduces_the_best_eval_loss(tiny_search, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tune_llama.loop import setup, validation_loss
    from tune_llama.spec import spec_from_dict

    assert (exported / "model.safetensors").is_file() and (exported / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    spec = spec_from_dict(json.loads((exported / EXPORT_FILE).read_text())["spec"])
    run = setup(spec, model=model, tokenizer=tokenizer)
    _, row = best_reported(tiny_search)
    assert validation_loss(run) == pytest.approx(row["eval_loss"], rel=1e-5, abs=1e-6)

    prompt = tokenizer(["Question: 2+3?\nAnswer: "], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt.input_ids.shape[1]


def test_export_json_holds_no_secret_from_the_environment(exported, fake_secrets):
    text = (exported / EXPORT_FILE).read_text()
    for name, value in fake_secrets.items():
        assert value not in text, f"{name} leaked into export.json"


def test_adapter_only_on_a_full_fine_tune_is_a_one_line_error(tiny_search, tmp_path, capsys):
    err = one_line_error(capsys, [str(tiny_search), "--adapter-only", "--out", str(tmp_path / "out")])
    assert "--adapter-only" in err and "model.lora.enabled" in err
    assert not (tmp_path / "out").exists()


def test_export_of_a_search_without_results_is_a_one_line_error(tiny_search, tmp_path, capsys):
    (tmp_path / "tune_llama_spec.json").write_text((tiny_search / "tune_llama_spec.json").read_text())
    err = one_line_error(capsys, [str(tmp_path)])
    assert "no trial has a checkpoint" in err


def test_a_checkpoint_ray_has_not_listed_yet_is_still_ranked_by_the_metrics_it_holds(tiny_search, tmp_path):
    """Right after a kill, result.json can lag behind the checkpoints on disk: export must still see them."""
    import shutil
    copy = tmp_path / "killed"
    shutil.copytree(tiny_search, copy, ignore=shutil.ignore_patterns("wandb", "export", "report"))
    for result in copy.glob("*/result.json"):
        result.write_text("")  # Ray never flushed a single row
    choice = choose(load_search(copy))
    trial_id, row = best_reported(tiny_search)
    assert (choice.trial.trial_id, choice.row["step"]) == (trial_id, row["step"])


def test_an_interrupted_export_leaves_no_folder_that_looks_complete(tiny_search, tmp_path, monkeypatch):
    import tune_llama.model as model_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(model_module, "save_hf_model", disk_full)
    with pytest.raises(OSError):
        export(tiny_search, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_export_without_any_checkpoint_left_is_a_one_line_error(tiny_search, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_search, copy, ignore=shutil.ignore_patterns("checkpoint_*", "wandb", "export", "report"))
    assert load_search(copy).best() is not None  # results are there, weights are not
    err = one_line_error(capsys, [str(copy)])
    assert "no trial has a checkpoint" in err


def one_line_error(capsys, argv: list[str]) -> str:
    return cli_error(command("export"), argv, capsys)


def test_evaluate_runs_on_the_export_with_the_prompt_template_it_was_trained_with(exported, tmp_path):
    import shutil
    from tune_llama.evaluate import gsm8k_accuracy

    model = tmp_path / "model"
    shutil.copytree(exported, model)
    info = json.loads((model / EXPORT_FILE).read_text())
    info["spec"]["data"]["prompt_template"] = "Q: {question}\nA: "
    (model / EXPORT_FILE).write_text(json.dumps(info))

    summary = gsm8k_accuracy(str(model), data="synthetic", limit=3, batch_size=3, max_new_tokens=8,
                       out=tmp_path / "eval.jsonl", device="cpu")
    assert summary["prompt_template"] == "Q: {question}\nA: "
    assert summary["n"] == 3 and len((tmp_path / "eval.jsonl").read_text().splitlines()) == 3


def test_an_export_is_readable_by_the_group_under_umask_0022(tiny_search, tmp_path):
    old = os.umask(0o022)
    try:
        out = export(tiny_search, tmp_path / "shared")
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert (out / "model.safetensors") in modes and modes[out] == 0o755
    assert {p: m for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)} == {}
