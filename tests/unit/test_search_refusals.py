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


def test_resume_of_a_spec_file_says_it_is_a_spec_and_gives_both_commands(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "x.yaml").write_text(TINY.read_text())
    err = one_line_error(command("search"), ["--resume", "specs/x.yaml"], capsys)
    assert err == ("error: --resume: specs/x.yaml is a spec file, not a search folder: resume the search with "
                   "--resume results/NAME (its folder), or start a new one: tune-llama search specs/x.yaml")
    assert not ray_started()


def test_resume_with_a_change_advises_a_new_warm_started_search_not_more_which_refuses_it_too(capsys, tmp_path):
    import json

    from tune_llama.results import SPEC_FILE
    from tune_llama.spec import load_spec
    (tmp_path / SPEC_FILE).write_text(json.dumps(load_spec(TINY).to_dict()))
    for extra in ([], ["--more", "2"]):
        err = one_line_error(command("search"), ["--resume", str(tmp_path), *extra, "--set", "training.epochs=8"],
                             capsys)
        assert err == ("error: --resume cannot change a search (--more neither): --set training.epochs=8 would be "
                       "ignored; start a new search with it, from this one's best configs: tune-llama search SPEC "
                       f"--set training.epochs=8 --set search.warm_start={tmp_path}")
