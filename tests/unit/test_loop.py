"""The plain-PyTorch fine-tuning loop: learning, reports inside an epoch, accumulation, exact resume, divergence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tune_llama.errors import CheckpointError
from conftest import TINY
from tune_llama.checkpoint import load_state, save_state
from tune_llama.loop import DATA_COUNTS, METRIC_NAMES, epoch_windows, fit, report_points, setup, train_step, validation_loss
from tune_llama.model import trainable_state
from tune_llama.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


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


def train_epoch(run):
    """One epoch through the loop's public pieces (what a benchmark does)."""
    for window in epoch_windows(run, run.step // run.steps_per_epoch):
        interval = train_step(run, window)
    return interval


def test_every_report_has_the_documented_metrics_with_perplexity_exp_of_loss():
    run = fit(setup(tiny("training.epochs=1", "data.synthetic_size=24", "data.val_size=8")))
    (metrics,) = run.history
    assert tuple(metrics) == METRIC_NAMES + DATA_COUNTS, "the first report also says what data.overlong did"
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_loss"] == pytest.approx(validation_loss(run), rel=1e-6)
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_gb"] > 0
    assert metrics["epoch"] == 1.0 and metrics["step"] == run.steps_per_epoch
    assert metrics["examples_seen"] == 16 and 0 < metrics["eval_share"] < 1


def test_eval_every_a_quarter_epoch_reports_four_times_an_epoch_with_fractional_epochs():
    run = fit(setup(tiny("training.epochs=2", "training.eval_every=0.25")))
    assert run.steps_per_epoch == 10  # reports after steps 3, 5, 8, 10 of each epoch
    assert [m["epoch"] for m in run.history] == pytest.approx([0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8, 2.0])
    assert [m["report"] for m in run.history] == list(range(1, 9))
    assert run.history[-1]["step"] == 2 * run.steps_per_epoch
    seen = [m["examples_seen"] for m in run.history]
    assert seen == sorted(seen) and seen[-1] == 2 * len(run.train_set)


@pytest.mark.parametrize("eval_every, steps_per_epoch, epochs, expected", [
    (1.0, 10, 2, [10, 20]),
    (0.5, 10, 1, [5, 10]),
    (0.25, 3, 1, [1, 2, 3]),  # more reports than steps: one per step, never twice
    (4, 10, 1, [4, 8, 10]),  # a step count; the end of training always reports
])
def test_report_points_end_each_fraction_of_an_epoch_or_every_n_steps(eval_every, steps_per_epoch, epochs, expected):
    training = tiny(f"training.eval_every={eval_every}", f"training.epochs={epochs}").training
    assert report_points(training, steps_per_epoch) == expected


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


@pytest.mark.parametrize("eval_every, stop_at_report, resumed_epoch", [(1.0, 1, 1.0), (0.5, 3, 1.5)])
def test_resume_from_saved_state_equals_training_straight_through(tmp_path, eval_every, stop_at_report,
                                                                   resumed_epoch):
    """Also from a checkpoint taken in the middle of an epoch: same batches, same order, same RNG."""
    overrides = ["training.epochs=2", "data.synthetic_size=40", "data.val_size=8", "model.lora.enabled=true",
                 "model.lora.dropout=0.1", "training.lr_schedule=cosine", "training.warmup_ratio=0.2",
                 f"training.eval_every={eval_every}"]
    straight = fit(setup(tiny(*overrides)))

    def stop_at(metrics, checkpoint):
        if metrics["report"] == stop_at_report:
            raise Interrupt

    first = setup(tiny(*overrides))
    with pytest.raises(Interrupt):
        fit(first, save_checkpoint=lambda run: save_state(run, tmp_path / "state"), report=stop_at)
    resumed = load_state(setup(tiny(*overrides)), tmp_path / "state")
    assert resumed.epoch == pytest.approx(resumed_epoch, abs=0.1)
    fit(resumed)
    assert_same_weights(snapshot(straight), snapshot(resumed), atol=1e-6)
    assert [m["eval_loss"] for m in resumed.history] == pytest.approx([m["eval_loss"] for m in straight.history])
    assert [m["train_loss"] for m in resumed.history] == pytest.approx([m["train_loss"] for m in straight.history])


def test_a_truncated_checkpoint_is_a_checkpoint_error_naming_the_folder(tmp_path):
    run = setup(tiny("training.epochs=1"))
    folder = save_state(run, tmp_path / "state")
    weights = folder / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(folder)):
        load_state(setup(tiny("training.epochs=1")), folder)


def test_lora_state_holds_only_the_adapter(tmp_path):
    run = setup(tiny("model.lora.enabled=true", "training.epochs=1"))
    names = list(trainable_state(run.model))
    assert names and all("lora_" in n for n in names)
    from safetensors.torch import load_file
    saved = load_file(save_state(run, tmp_path) / "trainable.safetensors")
    assert sorted(saved) == sorted(names)


def test_a_huge_learning_rate_ends_the_run_as_diverged():
    # 10 is the largest lr a spec accepts (spec.MAX_LR), and plain SGD at it still diverges on the tiny model.
    run = fit(setup(tiny("training.optimizer=sgd", "training.lr=10", "training.epochs=3")))
    assert run.status == "diverged"
    assert len(run.history) == 1 and run.history[-1]["status"] == "diverged"
    assert run.history[-1]["eval_loss"] == math.inf


def test_early_stopping_ends_exactly_patience_reports_after_the_best():
    # lr 1e-30 leaves float32 weights unchanged, so no report after the first is better.
    run = fit(setup(tiny("training.lr=1e-30", "training.optimizer=sgd", "training.epochs=6",
                         "training.early_stopping_patience=2", "data.synthetic_size=24", "data.val_size=8")))
    assert run.status == "early_stopped"
    assert len(run.history) == 1 + 2
    assert run.history[-1]["status"] == "early_stopped"


def test_embedded_smollm2_loads_and_takes_a_lora_step():
    run = setup(load_spec(ROOT / "search_spaces" / "demo.yaml",
                          ["data.source=synthetic", "data.synthetic_size=6", "data.val_size=2", "data.batch_size=2", "data.max_length=192",
                           "training.lr=1e-3"]))
    assert type(run.model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert run.tokenizer.pad_token == run.tokenizer.eos_token
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    adapter = snapshot(run)
    interval = train_epoch(run)
    assert math.isfinite(interval.mean_loss())
    assert any(not torch.equal(adapter[k], v) for k, v in snapshot(run).items())
    assert all(torch.equal(frozen[n], p) for n, p in run.model.named_parameters() if not p.requires_grad)
