"""What a newcomer meets in their first hour (issue 23): errors that name the real mistake, files a labmate
can read, hints that follow the search's state, warnings said once, a quiet terminal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import TINY, one_line_error
from tune_llama.__main__ import command
from tune_llama.errors import SpecError
from tune_llama.paths import looks_like_path, missing_folder
from tune_llama.spec import load_spec, spec_from_dict


# ---------------------------------------------------------------- 4. errors that name the real mistake

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
    assert err == f"error: model.name: directory not found: {Path(name).expanduser()}"
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


# ---------------------------------------------------------------- 2. files a labmate can read

def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_trains_best_model_is_readable_by_the_group_and_others_under_umask_0022(tmp_path, umask_0022):
    from tune_llama.train import train
    spec = load_spec(TINY, ["training.epochs=1", "data.synthetic_size=32"])
    train(spec, tmp_path / "run")
    found = modes(tmp_path / "run" / "best")
    assert "model.safetensors" in found
    assert {name: mode for name, mode in found.items() if mode != (0o755 if name == "." else 0o644)} == {}


def test_sharing_follows_the_umask_not_a_fixed_mode(tmp_path):
    from tune_llama.paths import share_as_umask_allows
    import tempfile
    private = Path(tempfile.mkdtemp(dir=tmp_path))
    (private / "sub").mkdir(mode=0o700)
    fd, name = tempfile.mkstemp(dir=private / "sub")
    os.close(fd)
    old = os.umask(0o027)
    try:
        share_as_umask_allows(private)
    finally:
        os.umask(old)
    assert modes(private) == {".": 0o750, "sub": 0o750, f"sub/{Path(name).name}": 0o640}


# ---------------------------------------------------------------- 5. eval_every that cannot be honoured

def test_an_eval_every_that_an_epoch_cannot_honour_is_said_once_per_cause_at_preflight(capsys):
    from tune_llama.preflight import preflight
    # 16 train problems in batches of 8: accumulation 1 gives 2 optimizer steps per epoch, 2 gives 1.
    spec = load_spec(TINY, ["data.synthetic_size=24", "data.val_size=8", "training.eval_every=0.5",
                            "search.space={data.batch_size: {choice: [4, 8]}, "
                            "training.gradient_accumulation_steps: {choice: [1, 2]}}"])
    preflight(spec)
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["note: trials with data.batch_size=8, training.gradient_accumulation_steps=2 have 1 optimizer "
                     "step per epoch; they report once per epoch, not the 2 times training.eval_every=0.5 asks for"]


def test_a_single_run_whose_epoch_has_too_few_steps_is_told_so_once(capsys, tmp_path):
    from tune_llama.preflight import preflight
    preflight(load_spec(TINY, ["data.synthetic_size=32", "data.val_size=8", "training.eval_every=0.25",
                               "search.space={}"]))
    assert capsys.readouterr().err.strip() == ("note: each trial has 3 optimizer steps per epoch; it reports 3 times "
                                               "per epoch, not the 4 times training.eval_every=0.25 asks for")


def test_an_eval_every_every_epoch_can_honour_says_nothing(capsys):
    from tune_llama.preflight import preflight
    preflight(load_spec(TINY, ["training.eval_every=0.5"]))
    assert "note:" not in capsys.readouterr().err


# ---------------------------------------------------------------- 8. quiet by default

def fresh_environment() -> dict[str, str]:
    """This process's environment without the switches an in-process command call set (``quiet_known_noise``):
    a subprocess then starts as a user's shell would start it."""
    from tune_llama.cli import PROGRESS_BAR_SWITCHES
    return {k: v for k, v in os.environ.items() if k not in PROGRESS_BAR_SWITCHES}


def train_stderr(tmp_path: Path, *extra: str) -> str:
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "tune_llama", "train", str(TINY), "--output", str(tmp_path / "run"),
                           "--set", "model.lora.enabled=true", "--set", "training.epochs=1",
                           "--set", "data.synthetic_size=24", "--set", "data.val_size=8", *extra],
                          capture_output=True, text=True, timeout=600, env=fresh_environment())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_a_lora_train_prints_only_its_own_progress_on_stderr_and_the_noise_with_verbose(tmp_path):
    quiet = train_stderr(tmp_path)
    assert [line for line in quiet.splitlines() if not line.startswith("train: ")] == []
    loud = train_stderr(tmp_path, "--verbose")
    assert "Writing model shards" in loud, "--verbose must bring the libraries' bars back"


def test_importing_the_package_installs_none_of_the_entry_points_filters():
    import subprocess
    import sys
    code = ("import warnings, logging, os; import tune_llama.train, tune_llama.export; "
            "print(not any(f[1] is not None and 'is_gradient_checkpointing' in f[1].pattern for f in warnings.filters),"
            " logging.getLogger('bitsandbytes.backends.cpu.ops').filters == [] "
            "and 'HF_HUB_DISABLE_PROGRESS_BARS' not in os.environ)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=fresh_environment()).stdout.split()
    assert out == ["True", "True"]
