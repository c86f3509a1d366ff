"""What a trial asks for is checked before it starts, in one line naming the field: the worker fields, a cluster
too small for a trial's CPUs, GPUs or memory, and a checkpoint of another number of workers."""

from __future__ import annotations

import json

import pytest
import torch

from tune_llama.spec import spec_from_dict


def test_a_checkpoint_of_two_workers_is_refused_in_one_line_by_another_number_of_workers(tmp_path):
    from tune_llama.checkpoint import WORKERS
    from tune_llama.distributed import Team, load_worker_state
    from tune_llama.errors import CheckpointError
    (tmp_path / WORKERS).write_text(json.dumps({"workers": 2, "parallel": "ddp"}))
    with pytest.raises(CheckpointError) as err:
        load_worker_state(None, Team(0, 3, torch.device("cpu"), "ddp"), tmp_path)
    assert "\n" not in str(err.value) and "search.resources.workers=2" in str(err.value)


def test_concurrent_trials_fit_the_cluster_unless_the_spec_asks_for_fewer():
    from tune_llama.errors import UserError
    from tune_llama.preflight import check_cluster
    spec = spec_from_dict({"search": {"max_concurrent": 8, "resources": {"workers": 2, "gpu": 1, "cpu": 4}}})
    assert check_cluster(spec, [{"GPU": 8, "CPU": 64}]) == 4
    assert check_cluster(spec, [{"GPU": 5, "CPU": 64}]) == 2
    assert check_cluster(spec, [{"GPU": 1, "CPU": 8}, {"GPU": 3, "CPU": 8}]) == 2, "workers span nodes"
    spec.search.max_concurrent = 1
    assert check_cluster(spec, [{"GPU": 8, "CPU": 64}]) == 1
    with pytest.raises(UserError, match="workers"):
        check_cluster(spec, [{"GPU": 1, "CPU": 64}])
    with pytest.raises(UserError, match="largest node offers cpu=2"):
        check_cluster(spec, [{"GPU": 8, "CPU": 2}])


def test_a_trial_asking_more_memory_than_any_node_has_is_refused_naming_memory_gb():
    from tune_llama.errors import UserError
    from tune_llama.preflight import check_cluster
    from tune_llama.resources import tune_trial_resources
    spec = spec_from_dict({"search": {"resources": {"cpu": 1, "gpu": 0, "memory_gb": 12}}})
    assert check_cluster(spec, [{"CPU": 2, "memory": 16 * 2**30}]) == spec.search.max_concurrent
    with pytest.raises(UserError, match=r"memory_gb=12, but the largest node offers cpu=2, gpu=0, memory_gb=8"):
        check_cluster(spec, [{"CPU": 2, "memory": 8 * 2**30}])
    assert tune_trial_resources(spec) == {"cpu": 1, "gpu": 0, "memory": 12 * 2**30}, "what with_resources is given"


def test_the_worker_fields_are_checked_with_one_line_naming_them():
    from tune_llama.errors import SpecError
    bad = {"search.resources.workers": {"search": {"resources": {"workers": 0}}},
           "training.parallel": {"training": {"parallel": "zero3"}}}
    for field, raw in bad.items():
        with pytest.raises(SpecError) as err:
            spec_from_dict(raw)
        assert str(err.value).startswith(field) and "\n" not in str(err.value)
    with pytest.raises(SpecError, match="training.parallel: fsdp cannot shard 4bit"):
        spec_from_dict({"training": {"parallel": "fsdp"}, "model": {"quantization": "4bit", "lora": {"enabled": True}}})
    assert spec_from_dict({}).search.resources.workers == 1 and spec_from_dict({}).training.parallel == "ddp"
