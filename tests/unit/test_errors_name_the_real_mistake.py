"""Errors that name the real mistake: a model name that looks like a path is a path (directory not found, no hub
call), and an unknown spec key names the closest known one."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, one_line_error
from tune_llama.__main__ import command
from tune_llama.errors import SpecError
from tune_llama.paths import looks_like_path, missing_folder
from tune_llama.spec import load_spec, spec_from_dict


@pytest.mark.parametrize("name", ["/tmp/my-llama-7b", "./my-llama", "~/models/llama", "results/x/exprt"])
def test_a_name_that_looks_like_a_path_is_a_path(name):
    assert looks_like_path(name)


@pytest.mark.parametrize("name", ["meta-llama/Llama-2-7b-hf", "gpt2", "embedded:smollm2", "random:tiny"])
def test_a_hub_id_or_a_builtin_name_is_not_a_path(name):
    assert not looks_like_path(name) and missing_folder(name) is None


def test_a_name_whose_parent_folder_exists_is_a_path_even_with_one_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    assert missing_folder("results/exprt") == Path("results/exprt")
    assert missing_folder("meta-llama/Llama-2-7b-hf") is None


@pytest.mark.parametrize("name", ["/tmp/no-such-llama-7b", "results/x/exprt"])
def test_a_missing_model_folder_is_directory_not_found_from_train_without_a_hub_call(capsys, tmp_path, name,
                                                                                     monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a hub call would be tried (and fail differently) if made
    err = one_line_error(command("train"), [str(TINY), "--output", str(tmp_path / "run"),
                                            "--set", f"model.name={name}"], capsys)
    where = "" if Path(name).is_absolute() else (f" (resolved against the current directory {Path.cwd()}, not the "
                                                 f"spec's folder {TINY.parent})")
    assert err == f"error: model.name: directory not found: {Path(name).expanduser()}{where}"
    assert not (tmp_path / "run").exists()


def test_evaluate_of_a_mistyped_export_folder_is_directory_not_found(capsys, tmp_path):
    err = one_line_error(command("evaluate"), [str(tmp_path / "results" / "x" / "exprt"), "--device", "cpu"], capsys)
    assert err == f"error: MODEL: directory not found: {tmp_path / 'results' / 'x' / 'exprt'}"


def test_an_unknown_spec_key_names_the_closest_known_key():
    with pytest.raises(SpecError, match=r"^training\.lrr: unknown key; did you mean training\.lr\? \(known: "):
        spec_from_dict({"model": {"name": "random:tiny"}, "training": {"lrr": 1e-3}})


def test_an_unknown_key_from_set_and_in_the_search_space_names_the_closest_too():
    with pytest.raises(SpecError, match=r"did you mean data\.batch_size\?"):
        load_spec(TINY, ["data.bacth_size=4"])
    with pytest.raises(SpecError, match=r"^search\.space\.training\.lrr: is not a spec field; did you mean training\.lr\?$"):
        spec_from_dict({"model": {"name": "random:tiny"}, "search": {"space": {"training.lrr": {"choice": [1e-3]}}}})


def test_a_key_like_no_known_one_gets_no_guess():
    with pytest.raises(SpecError) as info:
        spec_from_dict({"model": {"name": "random:tiny"}, "training": {"zzzzqqq": 1}})
    assert "did you mean" not in str(info.value)
