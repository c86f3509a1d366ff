"""A mistyped or other-tool field name gets the field it means, named in full, even in another section."""

from __future__ import annotations

import pytest

from tune_llama.spec import ALIASES, SpecError, field_paths, spec_from_dict


def error_for(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    return str(info.value)


@pytest.mark.parametrize("raw, meant", [
    ({"training": {"learning_rate": 1e-3}}, "training.lr"),
    ({"model": {"lora_rank": 4}}, "model.lora.r"),
    ({"model": {"lora": {"rank": 4}}}, "model.lora.r"),
    ({"training": {"grad_accum": 2}}, "training.gradient_accumulation_steps"),
    ({"training": {"gradient_accumulation": 2}}, "training.gradient_accumulation_steps"),
    ({"training": {"batch": 2}}, "data.batch_size"),
    ({"training": {"batch_size": 2}}, "data.batch_size"),
    ({"training": {"num_epochs": 2}}, "training.epochs"),
    ({"search": {"num_trials": 3}}, "search.num_samples"),
    ({"search": {"trials": 3}}, "search.num_samples"),
    ({"training": {"max_seq_length": 256}}, "data.max_length"),
    ({"training": {"scheduler": "cosine"}}, "training.lr_schedule"),
    ({"search": {"grace_period": 1}}, "search.asha.grace_period"),
])
def test_a_name_from_another_tool_suggests_the_field_it_means_wherever_it_is(raw, meant):
    assert f"did you mean {meant}?" in error_for(raw)


def test_a_field_put_in_the_wrong_section_suggests_the_section_it_belongs_to():
    assert "did you mean data.max_length?" in error_for({"training": {"max_length": 128}})
    assert "did you mean training.lr?" in error_for({"search": {"lr": 0.1}})


def test_a_plain_typo_still_gets_the_closest_name_of_its_own_section():
    assert "did you mean training.lr?" in error_for({"training": {"lrr": 0.1}})
    assert "did you mean training?" in error_for({"trainng": {}})


def test_a_search_space_key_by_another_name_suggests_the_field():
    raw = {"search": {"space": {"training.learning_rate": {"loguniform": [1e-5, 1e-3]}}}}
    assert error_for(raw) == "search.space.training.learning_rate: is not a spec field; did you mean training.lr?"


def test_every_alias_points_at_a_real_field_and_no_alias_is_a_field_of_its_own():
    fields = set(field_paths())
    assert set(ALIASES) <= fields, set(ALIASES) - fields
    for names in ALIASES.values():
        for name in names:
            section, _, leaf = name.rpartition(".")
            assert (f"{section}.{leaf}" if section else leaf) not in fields, name
