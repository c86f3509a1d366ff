"""The exception types survive Ray's trip between processes (pickle, copy) with their type and message."""

from __future__ import annotations

import copy
import pickle

import pytest

from tune_llama import errors


# ---------------------------------------------------------------- the exception types

def sample(kind: type) -> BaseException:
    """An instance of each type in ``errors.ALL``, built the way the package raises it."""
    if kind is errors.SpecError:
        return errors.SpecError("training.lr", "must be > 0, got -1")
    return kind(f"a {kind.__name__} message: /some/path/checkpoint_000002")


@pytest.mark.parametrize("kind", errors.ALL, ids=lambda k: k.__name__)
@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_every_error_type_survives_pickle_and_copy_with_its_type_and_message(kind, how):
    original = sample(kind)
    again = {"pickle": lambda e: pickle.loads(pickle.dumps(e)), "copy": copy.copy, "deepcopy": copy.deepcopy}[how](
        original)
    assert type(again) is kind
    assert str(again) == str(original)
    assert again.args == original.args
    if isinstance(original, errors.SpecError):
        assert (again.path, again.message) == ("training.lr", "must be > 0, got -1")


def test_a_spec_error_without_a_path_survives_pickle_as_its_bare_message():
    again = pickle.loads(pickle.dumps(errors.SpecError("", "spec file not found: x.yaml")))
    assert (str(again), again.path, again.message) == ("spec file not found: x.yaml", "", "spec file not found: x.yaml")


def test_every_user_facing_error_type_is_in_all():
    """A type added to errors.py but not to ALL would escape the pickle test above."""
    defined = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, BaseException)
               and v.__module__ == errors.__name__}
    assert defined == set(errors.ALL)
