"""Export without a search run: a LoRA trial's folder exports merged or adapter-only, a folder that is not a search
is a one-line error, and the evaluate hint names the data the search trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import one_line_error as cli_error
from tune_llama.__main__ import command
from tune_llama.export import EXPORT_FILE, export
from tune_llama.spec import ModelSpec


def one_line_error(capsys, argv: list[str]) -> str:
    return cli_error(command("export"), argv, capsys)


def test_export_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    err = one_line_error(capsys, [str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in err


def test_export_of_a_folder_that_is_not_a_search_is_a_one_line_error(tmp_path, capsys):
    err = one_line_error(capsys, [str(tmp_path)])
    assert "not a tune-llama search folder" in err


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


@pytest.mark.parametrize("source,tail", [("openai/gsm8k", ""), ("embedded:gsm8k-mini", " --data embedded:gsm8k-mini"),
                                         ("synthetic", " --data synthetic"),
                                         ("/data/my gsm8k", " --data '/data/my gsm8k'")])
def test_the_evaluate_hint_names_the_data_the_search_trained_on(source, tail, tmp_path):
    from tune_llama.export import evaluate_command
    assert evaluate_command(tmp_path / "out", source) == f"tune-llama evaluate {tmp_path / 'out'}{tail}"
