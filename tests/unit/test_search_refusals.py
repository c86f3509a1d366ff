"""Input a search cannot honour is refused with one line before Ray starts: an override on --resume, and a
--storage that cannot be created or written."""

from __future__ import annotations

from conftest import TINY, one_line_error
from tune_llama.__main__ import command


def ray_started() -> bool:
    import ray
    return ray.is_initialized()


def test_resume_with_an_override_is_refused_naming_the_override(capsys, tmp_path):
    err = one_line_error(command("search"), ["--resume", str(tmp_path), "--set", "training.lr=0.5"], capsys)
    assert "--set training.lr=0.5" in err and "--resume" in err
    assert not ray_started()


def test_a_storage_under_a_file_is_refused_before_ray_starts_and_nothing_is_written(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = one_line_error(command("search"), [str(TINY), "--storage", str(blocker / "searches"), "--name", "x"],
                         capsys)
    assert str(blocker / "searches") in err
    assert not ray_started()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_storage_that_does_not_exist_yet_passes_the_check_and_the_check_leaves_nothing(tmp_path):
    from tune_llama.preflight import check_storage
    check_storage(tmp_path / "new" / "searches")
    assert not list(tmp_path.iterdir())


def test_resume_with_an_override_that_repeats_the_searchs_own_value_is_not_refused(capsys, tmp_path):
    """A Slurm job resubmitted with --resume carries the first submission's --set arguments."""
    import json

    from tune_llama.results import SPEC_FILE
    from tune_llama.search import refuse_changes
    from tune_llama.spec import load_spec
    spec = load_spec(TINY, ["search.num_samples=3"])
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    refuse_changes(tmp_path, ["search.num_samples=3"])  # the same value: no error
    err = one_line_error(command("search"), ["--resume", str(tmp_path), "--set", "search.num_samples=4"], capsys)
    assert "--set search.num_samples=4" in err
