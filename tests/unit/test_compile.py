"""Regional compile: each decoder layer compiled in place, the same losses as eager, compile time apart."""

from __future__ import annotations

import pytest

from conftest import TINY
from tune_llama.loop import fit, setup
from tune_llama.model import trainable_state
from tune_llama.kernels import compile_wanted
from tune_llama.spec import load_spec

COMMON = ["data.synthetic_size=20", "data.val_size=4", "data.batch_size=8", "training.epochs=1",
          "training.eval_every=1", "model.lora.enabled=true", "model.lora.dropout=0.0", "training.lr=1e-2"]


def test_compiled_layers_train_like_eager_and_report_compile_time_apart():
    eager = fit(setup(load_spec(TINY, [*COMMON, "training.compile=false"])))
    run = setup(load_spec(TINY, [*COMMON, "training.compile=true"]))
    layers = run.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert trainable_state(run.model).keys() == trainable_state(eager.model).keys(), "names stay as they are"
    compiled = fit(run)
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], abs=1e-4)
    assert compiled.history[0]["eval_loss"] == pytest.approx(eager.history[0]["eval_loss"], abs=1e-4)
    # Compile time is its own figure: none without compiling, some with it. How it compares with the steps'
    # time depends on the machine's load, so that is left to bench/, not asserted here.
    assert eager.history[0]["compile_time_s"] == 0
    assert compiled.history[0]["compile_time_s"] > 0
    # The rate is the tokens over the steps' own time (compiling left out): the same tokens either way.
    def tokens(row: dict) -> float:
        return row["tokens_per_s"] * row["train_time_s"]
    assert compiled.history[0]["train_time_s"] > 0
    assert tokens(compiled.history[0]) == pytest.approx(tokens(eager.history[0]), rel=1e-6)


def test_compile_time_is_still_counted_after_a_compiler_reset_as_a_reused_trial_process_does():
    """A trial's end resets the compiler (trainable.train_trial), which clears dynamo's callbacks: the next
    trial in that process must still see its compiling counted."""
    import torch
    from tune_llama.kernels import CompileClock

    def compile_seconds_of_a_new_function() -> float:
        before = CompileClock.total()
        torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
        return CompileClock.total() - before

    assert compile_seconds_of_a_new_function() > 0
    torch.compiler.reset()
    assert compile_seconds_of_a_new_function() > 0


@pytest.mark.parametrize("choice, device, expected", [("auto", "cpu", False), ("auto", "cuda", True),
                                                      (True, "cpu", True), (False, "cuda", False)])
def test_compile_auto_means_cuda_only(choice, device, expected):
    import torch
    spec = load_spec(TINY, [f"training.compile={str(choice).lower()}"])
    assert compile_wanted(spec, torch.device(device)) is expected
