"""The plain-PyTorch fine-tuning loop: learning, accumulation, exact resume, divergence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tune_llama.loop import evaluate, fit, load_state, save_state, setup, train_epoch
from tune_llama.model import trainable_state
from tune_llama.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"


def tiny(*overrides: str):
    return load_spec(TINY, list(overrides))


def snapshot(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainable_state(run.model).items()}


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def test_loss_falls_over_epochs_on_tiny_spec():
    run = fit(setup(tiny("training.epochs=3")))
    losses = [m["eval_loss"] for m in run.history]
    assert run.status == "completed" and len(losses) == 3
    assert losses[-1] < losses[0] - 0.3
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]


def test_every_epoch_reports_the_documented_metrics_with_perplexity_exp_of_loss():
    run = fit(setup(tiny("training.epochs=1", "data.synthetic_size=24", "data.val_size=8")))
    (metrics,) = run.history
    assert set(metrics) == {"epoch", "train_loss", "train_perplexity", "eval_loss", "eval_perplexity",
                            "tokens_per_s", "epoch_time_s", "checkpoint_time_s", "peak_memory_gb", "status"}
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_loss"] == pytest.approx(evaluate(run), rel=1e-6)
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_gb"] > 0


def test_batch_4_equals_batch_1_with_4_accumulation_steps():
    common = ["data.batching=random", "data.synthetic_size=24", "data.val_size=4", "training.epochs=1",
              "training.optimizer=sgd", "training.lr=0.5"]
    big = setup(tiny(*common, "data.batch_size=4", "training.gradient_accumulation_steps=1"))
    small = setup(tiny(*common, "data.batch_size=1", "training.gradient_accumulation_steps=4"))
    before = snapshot(big)
    assert_same_weights(before, snapshot(small), atol=0)
    train_epoch(big)
    train_epoch(small)
    assert big.steps_per_epoch == small.steps_per_epoch == 5
    moved = max((snapshot(big)[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3, "the step must change the weights for the comparison to mean anything"
    assert_same_weights(snapshot(big), snapshot(small), atol=1e-5)


class Interrupt(Exception):
    pass


def test_resume_from_saved_state_equals_training_straight_through(tmp_path):
    overrides = ["training.epochs=2", "data.synthetic_size=40", "data.val_size=8", "model.lora.enabled=true",
                 "model.lora.dropout=0.1", "training.lr_schedule=cosine", "training.warmup_ratio=0.2"]
    straight = fit(setup(tiny(*overrides)))

    def stop_after_first_epoch(metrics, checkpoint):
        raise Interrupt

    first = setup(tiny(*overrides))
    with pytest.raises(Interrupt):
        fit(first, save_checkpoint=lambda run: save_state(run, tmp_path / "state"), report=stop_after_first_epoch)
    resumed = load_state(setup(tiny(*overrides)), tmp_path / "state")
    assert resumed.epoch == 1
    fit(resumed)
    assert_same_weights(snapshot(straight), snapshot(resumed), atol=1e-6)
    assert [m["eval_loss"] for m in resumed.history] == pytest.approx([m["eval_loss"] for m in straight.history])


def test_lora_state_holds_only_the_adapter(tmp_path):
    run = setup(tiny("model.lora.enabled=true", "training.epochs=1"))
    names = list(trainable_state(run.model))
    assert names and all("lora_" in n for n in names)
    from safetensors.torch import load_file
    saved = load_file(save_state(run, tmp_path) / "trainable.safetensors")
    assert sorted(saved) == sorted(names)


def test_a_huge_learning_rate_ends_the_run_as_diverged():
    run = fit(setup(tiny("training.optimizer=sgd", "training.lr=1e6", "training.epochs=3")))
    assert run.status == "diverged"
    assert len(run.history) == 1 and run.history[-1]["status"] == "diverged"
    assert run.history[-1]["eval_loss"] == math.inf


def test_early_stopping_ends_after_patience_epochs_without_improvement():
    run = fit(setup(tiny("training.lr=1e-9", "training.optimizer=sgd", "training.epochs=6",
                         "training.early_stopping_patience=2", "data.synthetic_size=24", "data.val_size=8")))
    assert run.status == "early_stopped"
    assert len(run.history) < 6


def test_embedded_smollm2_loads_and_takes_a_lora_step():
    run = setup(load_spec(ROOT / "search_spaces" / "demo.yaml",
                          ["data.synthetic_size=6", "data.val_size=2", "data.batch_size=2", "data.max_length=192",
                           "training.lr=1e-3"]))
    assert type(run.model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert run.tokenizer.pad_token == run.tokenizer.eos_token
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    adapter = snapshot(run)
    result = train_epoch(run)
    assert math.isfinite(result["train_loss"])
    assert any(not torch.equal(adapter[k], v) for k, v in snapshot(run).items())
    assert all(torch.equal(frozen[n], p) for n, p in run.model.named_parameters() if not p.requires_grad)
