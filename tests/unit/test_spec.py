"""The spec schema and the CLIs' handling of bad input: one line, naming the field, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY, one_line_error
from tune_llama.__main__ import command
from tune_llama.spec import SpecError, apply_params, load_spec, spec_from_dict


def test_every_shipped_spec_loads():
    for path in sorted((REPO_ROOT / "search_spaces").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.search.space, f"{path.name} searches nothing"


def test_overrides_are_parsed_with_the_fields_types():
    spec = load_spec(TINY, ["training.lr=5e-4", "training.epochs=2", "model.lora.enabled=true",
                            "training.max_grad_norm=null", "model.lora.target_modules=[q_proj]"])
    assert spec.training.lr == 5e-4 and isinstance(spec.training.lr, float)
    assert spec.training.epochs == 2 and spec.model.lora.enabled is True
    assert spec.training.max_grad_norm is None and spec.model.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize("override, field", [
    ("training.lr=0", "training.lr"),
    ("training.lr=-1e-3", "training.lr"),
    ("training.epochs=0", "training.epochs"),
    ("training.epochs=two", "training.epochs"),
    ("training.optimizer=adam", "training.optimizer"),
    ("training.learning_rate=1e-3", "training.learning_rate"),
    ("model.lora.r=0", "model.lora.r"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.prompt_template=Q", "data.prompt_template"),
    ("training.nesterov=true", "training.nesterov"),
    ("data.max_tokens_per_batch=most", "data.max_tokens_per_batch"),
    ("data.max_tokens_per_batch=16", "data.max_tokens_per_batch"),
    ("training.compile=sometimes", "training.compile"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("search.space={model.lora.rank: {choice: [4, 8]}}", "search.space.model.lora.rank"),
    ("search.space={training.epochs: {choice: [1, x]}}", "search.space.training.epochs.choice[1]"),
])
def test_a_bad_value_is_rejected_naming_its_field(override, field):
    with pytest.raises(SpecError) as err:
        load_spec(TINY, [override])
    assert err.value.path == field
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_speed_fields_take_auto_or_their_values():
    spec = load_spec(TINY, ["data.max_tokens_per_batch=auto", "training.compile=true",
                            "model.attn_implementation=flex_attention", "data.packing=false"])
    assert spec.data.max_tokens_per_batch == "auto" and spec.training.compile is True
    assert spec.model.attn_implementation == "flex_attention" and spec.data.packing is False
    assert load_spec(TINY, ["data.max_tokens_per_batch=4096"]).data.max_tokens_per_batch == 4096
    assert load_spec(TINY).training.compile == "auto" and load_spec(TINY).data.packing is True
    with pytest.raises(SpecError, match="must be an integer, got 'most'; or must be one of auto"):
        load_spec(TINY, ["data.max_tokens_per_batch=most"])


def test_an_unknown_section_is_rejected():
    with pytest.raises(SpecError, match="^optim: unknown key"):
        spec_from_dict({"optim": {"lr": 1}})


def test_sampled_params_are_applied_with_the_fields_types():
    spec = apply_params(load_spec(TINY), {"training.lr": 1e-3, "training.gradient_accumulation_steps": 2.0,
                                          "model.lora.r": 16.0})
    assert spec.training.lr == 1e-3
    assert spec.training.gradient_accumulation_steps == 2 and isinstance(spec.training.gradient_accumulation_steps, int)
    assert spec.model.lora.r == 16


def cli_error(capsys, main, argv) -> str:
    return one_line_error(main, argv, capsys)


@pytest.mark.parametrize("override, field", [
    ("training.lr=0", "training.lr"),
    ("training.epochs=0", "training.epochs"),
    ("unknown.key=1", "unknown"),
    ("training.lr=fast", "training.lr"),
])
def test_train_cli_rejects_bad_overrides_in_one_line(capsys, tmp_path, override, field):
    err = cli_error(capsys, command("train"), [str(TINY), "--output", str(tmp_path / "run"), "--set", override])
    assert field in err
    assert not (tmp_path / "run").exists()


def test_max_length_below_the_longest_prompt_is_rejected(capsys, tmp_path):
    err = cli_error(capsys, command("train"), [str(TINY), "--output", str(tmp_path), "--set", "data.max_length=20"])
    assert "data.max_length" in err


def test_a_missing_spec_file_is_named(capsys, tmp_path):
    err = cli_error(capsys, command("train"), [str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in err


def test_invalid_yaml_is_reported_with_its_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: [1\n")
    err = cli_error(capsys, command("train"), [str(bad)])
    assert "bad.yaml" in err and "line" in err


def test_train_cli_writes_metrics_summary_and_a_loadable_best_model(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tune_llama.train", str(TINY), "--output", str(out),
                           "--set", "training.epochs=2", "--set", "data.synthetic_size=32", "--set", "data.val_size=8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_eval_loss"] == min(r["eval_loss"] for r in rows)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "best")
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    ids = tokenizer("Question: 1+1?\nAnswer: ", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
