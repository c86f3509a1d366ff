"""evaluate writes its per-problem results beside the model it scored (``MODEL/eval/``), named for the data,
split and settings; a model that is not a local folder keeps ``results/eval/``; ``--out`` wins over both."""

from __future__ import annotations

import json

import torch

from tune_llama.evaluate import default_out, gsm8k_accuracy
from tune_llama.model import load_model, load_tokenizer, save_hf_model
from tune_llama.spec import ModelSpec


def test_without_out_the_results_go_beside_the_model_folder_named_for_data_split_and_settings(tmp_path, monkeypatch):
    spec = ModelSpec(name="random:tiny")
    tokenizer = load_tokenizer(spec)
    model_dir = save_hf_model(load_model(spec, tokenizer, torch.device("cpu")), tokenizer, tmp_path / "export")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    summary = gsm8k_accuracy(str(model_dir), data="synthetic", limit=2, max_new_tokens=4, device="cpu")
    out = model_dir / "eval" / "synthetic-test-limit2.jsonl"
    assert summary["out"] == str(out)
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 2
    assert not (work / "results").exists()


def test_settings_that_change_the_score_change_the_file_name():
    names = {default_out("random:tiny", "../shared/gsm8k", "test").name,
             default_out("random:tiny", "../shared/gsm8k", "test", limit=200).name,
             default_out("random:tiny", "../shared/gsm8k", "test", shots=3).name,
             default_out("random:tiny", "../shared/gsm8k", "test", calculator=True).name,
             default_out("random:tiny", "../shared/gsm8k", "validation").name}
    assert len(names) == 5


def test_a_hub_id_or_built_in_model_keeps_results_eval_under_the_working_folder():
    assert default_out("meta-llama/Llama-2-7b-hf", "openai/gsm8k", "test").parent.as_posix() == "results/eval"
    assert default_out("random:tiny", "synthetic", "test").as_posix() == "results/eval/random-tiny-synthetic-test.jsonl"
