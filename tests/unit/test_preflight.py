"""Preflight: every refusal a run makes at setup is made by ``search`` before Ray is even imported, with
nothing left behind; the data and path checks too; and a max_length that drops most of the data is refused.

The searches run in one fresh interpreter (``refusals``), so "before Ray starts" is a fact the test reads:
whether ``ray`` was ever imported.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tune_llama.preflight import check_inputs, full_lengths
from tune_llama.spec import load_spec

from conftest import REPO_ROOT, TINY, one_line_error

PACKAGE = REPO_ROOT / "tune_llama"
SETUP_MODULES = ("loop.py", "model.py", "kernels.py", "memory.py", "distributed.py")
"""Where a run refuses a spec at setup, after preflight in ``train`` and inside every trial in a search."""

CASES = {  # field -> the --set values that make a run refuse it on this CPU-only machine
    "training.device": ["training.device=cuda"],
    "model.attn_implementation": ["model.attn_implementation=flex_attention"],
    "model.quantization": ["model.lora.enabled=true", "model.quantization=4bit"],
    "training.optimizer": ["training.optimizer=adamw_8bit"],
    "model.kernels": ["model.kernels=liger"],
    "model.lora.target_modules": ["model.lora.enabled=true", "model.lora.target_modules=[q_proj, qkv]"],
    "model.name": ["model.name=random:huge"],
    "training.parallel": ["model.name={gpt2}", "model.tokenizer=random:tiny", "training.parallel=fsdp",
                          "search.resources.workers=2"],
}
SPACE_CASE = {"training.optimizer": {"choice": ["adamw", "adamw_8bit"]}}
"""A searched choice that only some trials draw: every trial that draws it would fail."""


def setup_refusal_fields() -> set[str]:
    """The fields named by a literal ``SpecError("field", ...)`` or ``cuda_package("field", ...)`` in the
    setup modules: the refusals a run can make once preflight has passed."""
    fields = set()
    for name in SETUP_MODULES:
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("SpecError", "cuda_package") \
                    and node.args and isinstance(node.args[0], ast.Constant):
                fields.add(node.args[0].value)
    return fields


def test_the_cases_cover_every_setup_refusal_of_the_loop_and_model():
    fields = setup_refusal_fields()
    assert {"training.device", "model.attn_implementation", "model.quantization"} <= fields  # the parse sees them
    assert fields <= set(CASES), f"add a case for {sorted(fields - set(CASES))} (and make preflight refuse it)"


RUN_EACH = """
import contextlib, io, json, sys
from tune_llama.__main__ import run_command
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_command("search", argv)
        except SystemExit as exit_:
            code = exit_.code
    out[name] = {"code": code, "stderr": err.getvalue()}
print(json.dumps({"cases": out, "ray imported": "ray" in sys.modules}))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> tuple[dict, bool, Path]:
    """Each case run as ``tune-llama search tiny.yaml --set ...`` in one interpreter: (case -> exit code and
    stderr, whether Ray was ever imported, the storage folder)."""
    work = tmp_path_factory.mktemp("refusals")
    from transformers import GPT2Config  # a model whose layers are not model.layers: FSDP cannot shard it
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=128, bos_token_id=0,
               eos_token_id=0).save_pretrained(work / "gpt2")
    raw = yaml.safe_load(TINY.read_text())
    raw["search"]["space"].update(SPACE_CASE)
    (work / "space.yaml").write_text(yaml.safe_dump(raw))
    storage = work / "results"
    argvs = {name: [str(TINY), "--storage", str(storage), "--name", name.replace(".", "-"),
                    *[a for s in sets for a in ("--set", s.replace("{gpt2}", str(work / "gpt2")))]]
             for name, sets in CASES.items()}
    argvs["search.space"] = [str(work / "space.yaml"), "--storage", str(storage), "--name", "space"]
    proc = subprocess.run([sys.executable, "-c", RUN_EACH, json.dumps(argvs)], cwd=work, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["cases"], result["ray imported"], storage


@pytest.mark.parametrize("field", sorted(CASES))
def test_search_refuses_each_setup_refusal_in_one_line_naming_the_field(refusals, field):
    cases, _, _ = refusals
    case = cases[field]
    assert case["code"] == 2, case["stderr"]
    lines = case["stderr"].strip().splitlines()
    assert lines[-1].startswith(f"error: {field}: "), lines
    assert not any("Ray" in line for line in lines), lines  # not even "starting Ray"


def test_a_refused_choice_of_the_space_is_named_with_its_value(refusals):
    case = refusals[0]["search.space"]
    assert case["code"] == 2
    assert case["stderr"].strip().splitlines()[-1] == (
        "error: search.space.training.optimizer: 'adamw_8bit' is refused: training.optimizer: adamw_8bit needs "
        "CUDA; this machine has no GPU (set training.optimizer=adamw)")


def test_no_refusal_imported_ray_or_left_a_folder(refusals):
    _, ray_imported, storage = refusals
    assert not ray_imported
    assert not storage.exists() or not any(storage.iterdir())


def test_train_refuses_the_same_before_making_its_run_folder(tmp_path, capsys):
    from tune_llama.__main__ import command
    out = tmp_path / "run"
    err = one_line_error(command("train"), [str(TINY), "--output", str(out),
                                             "--set", "model.attn_implementation=flex_attention"], capsys)
    assert err.startswith("error: model.attn_implementation: ") and not out.exists()


# ---------------------------------------------------------------- paths and data

def test_a_relative_path_not_found_names_the_folder_it_was_resolved_against_and_the_specs(tmp_path, monkeypatch):
    spec_dir, work = tmp_path / "project" / "specs", tmp_path / "elsewhere" / "work"
    for folder in (spec_dir, work, tmp_path / "project" / "data"):  # ../data: beside the spec, not the working folder
        folder.mkdir(parents=True)
    spec_file = spec_dir / "s.yaml"
    spec_file.write_text("model: {name: 'random:tiny'}\ndata: {source: ../data}\n")
    monkeypatch.chdir(work)
    with pytest.raises(Exception) as info:
        check_inputs(load_spec(spec_file), str(spec_file))
    assert str(info.value) == (f"data.source: directory not found: ../data (resolved against the current directory "
                               f"{work}, not the spec's folder {spec_dir}; it is there: give "
                               f"{tmp_path / 'project' / 'data'})")


def test_a_wrong_data_path_is_refused_by_search_before_ray_starts(tmp_path, capsys):
    from tune_llama.__main__ import command
    err = one_line_error(command("search"), [str(TINY), "--storage", str(tmp_path / "r"),
                                              "--set", "data.source=./no/such/folder"], capsys)
    assert err == ("error: data.source: directory not found: ./no/such/folder (resolved against the current "
                   f"directory {Path.cwd()}, not the spec's folder {TINY.parent})")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- max_length

def keeps_99_percent(message: str, spec) -> int:
    """The max_length a message suggests, checked to be the smallest that keeps 99% of the examples whole."""
    keeps = int(message.rsplit("data.max_length=", 1)[1].split()[0])
    from tune_llama.data import load_splits
    from tune_llama.model import load_tokenizer
    lengths = full_lengths(load_splits(spec.data).train, load_tokenizer(spec.model), spec)
    assert sum(n <= keeps for n in lengths) >= 0.99 * len(lengths) > sum(n <= keeps - 1 for n in lengths)
    return keeps


def test_a_max_length_that_drops_most_training_examples_is_refused_with_the_length_that_keeps_99_percent():
    spec = load_spec(TINY, ["data.max_length=280", "data.overlong=drop"])
    with pytest.raises(Exception) as info:
        check_inputs(spec)
    message = str(info.value)
    assert message.startswith("data.max_length: 280 drops 51 of 80 training examples (64%, over "
                              "data.max_dropped_share=0.5; data.overlong=drop); data.max_length="), message
    assert message.endswith("keeps 99% of them whole: raise it, or set data.max_dropped_share: 1 to train on the rest")
    keeps_99_percent(message, spec)


def test_a_max_length_that_drops_every_example_says_which_keeps_99_percent():
    spec = load_spec(TINY, ["data.max_length=150", "data.overlong=drop"])
    with pytest.raises(Exception) as info:
        check_inputs(spec)
    assert str(info.value).startswith("data.max_length: all 80 examples are longer than 150 tokens")
    keeps_99_percent(str(info.value), spec)


def test_dropping_most_examples_is_accepted_when_asked_for_and_said_in_one_note(capsys):
    spec = load_spec(TINY, ["data.max_length=280", "data.overlong=drop", "data.max_dropped_share=1"])
    checked = check_inputs(spec)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "max_length" in line]
    assert notes == [f"note: data.max_length=280 cuts 51 of 80 training examples (64%: 0 truncated, 51 dropped; "
                     f"data.overlong=drop) and {checked.val.dropped} of 16 validation examples; data.max_length=374 "
                     f"keeps 99% of them whole"], err
    assert len(checked.train) == 80 - 51
