"""Export of a search's best trial: a plain Hugging Face directory that reproduces the reported loss."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from conftest import one_line_error as cli_error
from tune_llama.__main__ import command
from tune_llama.export import EXPORT_FILE, export
from tune_llama.export import choose
from tune_llama.results import load_search
from tune_llama.spec import ModelSpec


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


@pytest.mark.integration
def test_export_picks_the_best_report_of_any_trial_and_records_it(tiny_search, exported):
    trial_id, row = best_reported(tiny_search)
    info = json.loads((exported / EXPORT_FILE).read_text())
    assert info["trial_id"] == trial_id
    assert (info["epoch"], info["step"], info["report"]) == (row["epoch"], row["step"], row["report"])
    assert info["metrics"]["eval_loss"] == row["eval_loss"]
    assert info["params"] == row["config"]
    assert info["spec"]["training"]["lr"] == row["config"]["training.lr"]  # the trial's spec, params applied
    assert {"torch", "transformers", "python"} <= set(info["versions"])


@pytest.mark.integration
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


@pytest.mark.integration
def test_export_json_holds_no_secret_from_the_environment(exported, fake_secrets):
    text = (exported / EXPORT_FILE).read_text()
    for name, value in fake_secrets.items():
        assert value not in text, f"{name} leaked into export.json"


@pytest.mark.integration
def test_adapter_only_on_a_full_fine_tune_is_a_one_line_error(tiny_search, tmp_path, capsys):
    err = one_line_error(capsys, [str(tiny_search), "--adapter-only", "--out", str(tmp_path / "out")])
    assert "--adapter-only" in err and "model.lora.enabled" in err
    assert not (tmp_path / "out").exists()


def test_export_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    err = one_line_error(capsys, [str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in err


def test_export_of_a_folder_that_is_not_a_search_is_a_one_line_error(tmp_path, capsys):
    err = one_line_error(capsys, [str(tmp_path)])
    assert "not a tune-llama search folder" in err


@pytest.mark.integration
def test_export_of_a_search_without_results_is_a_one_line_error(tiny_search, tmp_path, capsys):
    (tmp_path / "tune_llama_spec.json").write_text((tiny_search / "tune_llama_spec.json").read_text())
    err = one_line_error(capsys, [str(tmp_path)])
    assert "no trial has a checkpoint" in err


@pytest.mark.integration
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


@pytest.mark.integration
def test_an_interrupted_export_leaves_no_folder_that_looks_complete(tiny_search, tmp_path, monkeypatch):
    import tune_llama.model as model_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(model_module, "save_hf_model", disk_full)
    with pytest.raises(OSError):
        export(tiny_search, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


@pytest.mark.integration
def test_export_without_any_checkpoint_left_is_a_one_line_error(tiny_search, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_search, copy, ignore=shutil.ignore_patterns("checkpoint_*", "wandb", "export", "report"))
    assert load_search(copy).best() is not None  # results are there, weights are not
    err = one_line_error(capsys, [str(copy)])
    assert "no trial has a checkpoint" in err


def one_line_error(capsys, argv: list[str]) -> str:
    return cli_error(command("export"), argv, capsys)


@pytest.mark.integration
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


# ---------------------------------------------------------------- LoRA: merged and adapter-only

@pytest.fixture(scope="module")
def lora_search(tmp_path_factory):
    """A one-trial LoRA search folder as the search writes it, built from a plain loop run (no Ray)."""
    from tune_llama.checkpoint import save_state
    from tune_llama.loop import fit, setup
    from tune_llama.spec import apply_params, load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "search_spaces" / "tiny.yaml",
                     ["model.lora.enabled=true", "model.lora.target_modules=[q_proj, v_proj]", "training.epochs=1",
                      "training.device=cpu", "training.optimizer=adamw", "data.synthetic_size=24", "data.val_size=8",
                      "search.space={model.lora.r: {choice: [4, 8]}}"])
    params = {"model.lora.r": 4}
    run = fit(setup(apply_params(spec, params)))
    experiment = tmp_path_factory.mktemp("lora") / "lora"
    trial = experiment / "train_trial_0a1b2c3d_1_model_lora_r=4"
    trial.mkdir(parents=True)
    (experiment / "tune_llama_spec.json").write_text(json.dumps(spec.to_dict()))
    (trial / "params.json").write_text(json.dumps(params))
    row = {**run.history[0], "trial_id": "0a1b2c3d", "checkpoint_dir_name": "checkpoint_000000", "config": params}
    (trial / "result.json").write_text(json.dumps(row) + "\n")
    save_state(run, trial / "checkpoint_000000")
    return experiment, run


def test_lora_export_merges_the_adapter_into_plain_weights(lora_search, tmp_path):
    from transformers import AutoModelForCausalLM
    from tune_llama.model import load_model

    experiment, run = lora_search
    out = export(experiment, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = run.val_set.input_ids[0].unsqueeze(0)
    run.model.eval()
    with torch.no_grad():
        expected = run.model(input_ids=ids).logits
        base = load_model(ModelSpec(name=run.spec.model.name), run.tokenizer, torch.device("cpu"),
                          seed=run.spec.training.seed).eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4), "the trained adapter must change the model"


def test_adapter_only_export_writes_the_peft_adapter_and_no_full_weights(lora_search, tmp_path):
    experiment, _ = lora_search
    out = export(experiment, tmp_path / "adapter", adapter_only=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / EXPORT_FILE).read_text())["adapter_only"] is True


@pytest.mark.integration
def test_an_export_is_readable_by_the_group_under_umask_0022(tiny_search, tmp_path):
    old = os.umask(0o022)
    try:
        out = export(tiny_search, tmp_path / "shared")
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert (out / "model.safetensors") in modes and modes[out] == 0o755
    assert {p: m for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)} == {}


@pytest.mark.parametrize("source,tail", [("openai/gsm8k", ""), ("embedded:gsm8k-mini", " --data embedded:gsm8k-mini"),
                                         ("synthetic", " --data synthetic"),
                                         ("/data/my gsm8k", " --data '/data/my gsm8k'")])
def test_the_evaluate_hint_names_the_data_the_search_trained_on(source, tail, tmp_path):
    from tune_llama.export import evaluate_command
    assert evaluate_command(tmp_path / "out", source) == f"tune-llama evaluate {tmp_path / 'out'}{tail}"
