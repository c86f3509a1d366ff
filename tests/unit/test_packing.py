"""Padding-free packed micro-batches: the same loss, gradients and training as padded rows, exact resume,
and a step that runs out of memory retried in halves with the same update."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from tune_llama.data.batching import collate, make_batches, split_batch
from tune_llama.data.packing import answer_positions, collate_packed, examples_of, first_fit_rows
from tune_llama.checkpoint import load_state, save_state
from tune_llama.loop import epoch_windows, fit, label_count, setup, train_step
from tune_llama.loss import answer_only_loss, model_loss
from tune_llama.model import trainable_state
from tune_llama.memory import probe_budget
from tune_llama.errors import SpecError
from tune_llama.spec import load_spec

COMMON = ["data.synthetic_size=40", "data.val_size=8", "model.lora.dropout=0.0", "data.max_length=600"]


def tiny(*overrides: str):
    return load_spec(TINY, [*COMMON, *overrides])


def snapshot(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainable_state(run.model).items()}


def worst_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


SHORTENED = [40, 150, 60, 0, 90, 30, 120]
"""Answer tokens kept per example (0: the whole example), so that short examples share rows."""


def both_layouts(run, batch_size: int = 6, one_row: bool = False):
    """The same examples (of mixed lengths, as in a random batch) as a padded and as a packed micro-batch
    (in one row with ``one_row``). A shortened example keeps its first token (a prompt token: no label)
    and its last ``n`` tokens."""
    ids, labels = [], []
    for x, y, n in zip(run.train_set.input_ids, run.train_set.labels, SHORTENED[:batch_size]):
        ids.append(torch.cat([x[:1], x[-n:]]) if n else x)
        labels.append(torch.cat([y[:1], y[-n:]]) if n else y)
    pad = run.tokenizer.pad_token_id
    return collate(ids, labels, pad), collate_packed(ids, labels, pad, one_row)


def test_rows_are_filled_first_fit_longest_first_and_no_longer_than_the_longest_example():
    assert first_fit_rows([5, 3, 4, 2, 8]) == [[4], [0, 1], [2, 3]]
    assert first_fit_rows([3, 3, 3]) == [[0], [1], [2]]
    assert first_fit_rows([9, 1, 2, 6]) == [[0], [3, 2, 1]]


def test_a_packed_batch_has_no_padding_inside_rows_and_positions_restart_per_example():
    run = setup(tiny())
    padded, packed = both_layouts(run)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0], "several examples share a row"
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    starts = int((packed["position_ids"] == 0).sum())
    assert starts == len(packed["example_lengths"]) == 6
    ids, labels = examples_of(packed)
    original = examples_of(padded)[0]
    assert sorted(x.tolist() for x in ids) == sorted(x.tolist() for x in original)


def test_one_row_packing_puts_the_whole_batch_in_a_single_row_without_any_padding():
    run = setup(tiny())
    padded, packed = both_layouts(run, one_row=True)
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    assert int((packed["position_ids"] == 0).sum()) == len(packed["example_lengths"]) == 6
    assert sorted(x.tolist() for x in examples_of(packed)[0]) == sorted(x.tolist() for x in examples_of(padded)[0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("answer_only", [True, False])
@pytest.mark.parametrize("one_row", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_path(attention, lora, answer_only, one_row):
    run = setup(tiny(f"model.attn_implementation={attention}", f"model.lora.enabled={str(lora).lower()}"))
    padded, packed = both_layouts(run, one_row=one_row)
    n = label_count(padded)
    assert label_count(packed) == n, "no label crosses from one packed example into the next"
    params = [p for p in run.model.parameters() if p.requires_grad]

    def loss_and_grads(batch):
        run.model.zero_grad(set_to_none=True)
        loss = answer_only_loss(run.model, batch, n) if answer_only else model_loss(run.model, batch, n)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    padded_loss, padded_grads = loss_and_grads(padded)
    packed_loss, packed_grads = loss_and_grads(packed)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)
    worst = max((a - b).abs().max().item() for a, b in zip(packed_grads, padded_grads))
    assert worst <= 1e-5, f"gradients differ by {worst}"
    assert max(g.abs().max().item() for g in padded_grads) > 1e-4, "the comparison must see real gradients"


@pytest.mark.parametrize("one_row", [False, True])
def test_flex_attention_keeps_packed_examples_apart_in_the_forward_pass(one_row):
    """FlexAttention has no backward on CPU (torch raises), so here only the loss: the document mask
    transformers builds from the position ids gives the padded path's value, in first-fit rows and in the
    one row the loop packs for it."""
    with pytest.raises(SpecError, match="^model.attn_implementation: flex_attention has no backward"):
        setup(tiny("model.attn_implementation=flex_attention"))
    run = setup(tiny())
    run.model.set_attn_implementation("flex_attention")
    assert run.model.config._attn_implementation == "flex_attention"
    padded, packed = both_layouts(run, one_row=one_row)
    n = label_count(padded)
    with torch.no_grad():
        assert answer_only_loss(run.model, packed, n).item() == pytest.approx(
            answer_only_loss(run.model, padded, n).item(), abs=1e-5)


def test_without_restarting_positions_packed_examples_see_each_other():
    """The check above can fail: the same packed row read as one sequence gives another loss."""
    run = setup(tiny())
    padded, packed = both_layouts(run)
    n = label_count(padded)
    one_sequence = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    with torch.no_grad():
        apart, mixed = answer_only_loss(run.model, packed, n), answer_only_loss(run.model, one_sequence, n)
        reference = answer_only_loss(run.model, padded, n)
    assert apart.item() == pytest.approx(reference.item(), abs=1e-5)
    assert abs(mixed.item() - reference.item()) > 1e-4, "100x the tolerance the equality tests allow"


@pytest.mark.parametrize("budget", [None, 1800])
def test_training_packed_equals_training_padded_with_accumulation(budget):
    """Same examples per step, token-exact accumulation: the same weights after every step of an epoch.
    With a budget the two layouts cut different batches (real tokens vs rows x longest), so only the
    padded-by-rows case is compared step for step; the budgeted one must still learn the same way."""
    common = ["training.epochs=1", "training.optimizer=sgd", "training.lr=0.5", "model.lora.enabled=true",
              "training.gradient_accumulation_steps=2", "data.batch_size=3"]
    if budget:
        common.append(f"data.max_tokens_per_batch={budget}")
    packed = setup(tiny(*common, "data.packing=true"))
    padded = setup(tiny(*common, "data.packing=false"))
    assert packed.packing and not padded.packing
    before = snapshot(packed)
    for run in (packed, padded):
        for window in epoch_windows(run, 0):
            train_step(run, window)
    assert worst_gap(snapshot(packed), before) > 1e-3
    if budget is None:
        assert worst_gap(snapshot(packed), snapshot(padded)) <= 1e-5
        assert packed.tokens_seen == padded.tokens_seen
    else:
        batches = [b for window in epoch_windows(packed, 0) for b in window]
        assert all(int(b["example_lengths"].sum()) <= budget for b in batches), "the budget counts real tokens"
        assert max(len(b["example_lengths"]) for b in batches) > 1800 // max(packed.train_set.lengths)
        assert packed.examples_seen == padded.examples_seen == len(packed.train_set)


def test_packed_resume_from_the_middle_of_an_epoch_equals_training_straight_through(tmp_path):
    overrides = ["training.epochs=2", "model.lora.enabled=true", "model.lora.dropout=0.1",
                 "training.lr_schedule=cosine", "training.eval_every=0.5", "data.max_tokens_per_batch=1800"]
    straight = fit(setup(tiny(*overrides)))
    assert straight.packing

    class Interrupt(Exception):
        pass

    def stop_at(metrics, checkpoint):
        if metrics["report"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(setup(tiny(*overrides)), save_checkpoint=lambda run: save_state(run, tmp_path / "s"), report=stop_at)
    resumed = load_state(setup(tiny(*overrides)), tmp_path / "s")
    assert resumed.epoch == pytest.approx(1.5, abs=0.2)
    fit(resumed)
    assert worst_gap(snapshot(straight), snapshot(resumed)) <= 1e-6
    assert [m["train_loss"] for m in resumed.history] == pytest.approx([m["train_loss"] for m in straight.history])


def test_the_answer_position_gather_equals_boolean_masking():
    run = setup(tiny())
    padded, packed = both_layouts(run)
    for batch in (padded, packed):
        index, targets = answer_positions(batch["labels"])
        shifted = batch["labels"][:, 1:]
        assert torch.equal(targets, shifted[shifted != -100])
        hidden = torch.randn(*batch["labels"].shape, 5)
        gathered = hidden[:, :-1].reshape(-1, 5).index_select(0, index)
        assert torch.equal(gathered, hidden[:, :-1][shifted != -100])


@pytest.mark.parametrize("layout", ["packed", "one row", "padded"])
def test_split_halves_keep_every_example_once_in_the_same_layout(layout):
    run = setup(tiny())
    padded, packed = both_layouts(run, batch_size=7, one_row=layout == "one row")
    batch = padded if layout == "padded" else packed
    halves = split_batch(batch, run.tokenizer.pad_token_id)
    assert all(len(h["input_ids"]) == 1 for h in halves) == (layout == "one row")
    assert [len(examples_of(h)[0]) for h in halves] == [3, 4]
    assert sum(label_count(h) for h in halves) == label_count(batch)
    rows = lambda b: sorted(x.tolist() for x in examples_of(b)[0])  # noqa: E731
    assert rows(halves[0]) + rows(halves[1]) != [] and sorted(rows(halves[0]) + rows(halves[1])) == rows(batch)


class OutOfMemoryOnce:
    """A forward hook on the decoder that raises CUDA's out-of-memory error the first ``times`` calls whose
    input holds more than ``above`` tokens."""

    def __init__(self, above: int, times: int = 1):
        self.above, self.left = above, times

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.left and ids is not None and ids.numel() > self.above:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")


@pytest.mark.parametrize("packing", [True, False])
def test_a_step_out_of_memory_is_retried_in_halves_with_the_same_update(packing):
    common = ["training.epochs=1", "training.optimizer=sgd", "training.lr=0.5", "model.lora.enabled=true",
              "data.batch_size=4", "training.gradient_accumulation_steps=2", f"data.packing={str(packing).lower()}",
              "training.eval_every=2"]
    calm, hit = setup(tiny(*common)), setup(tiny(*common))
    hook = hit.model.get_base_model().model.register_forward_pre_hook(OutOfMemoryOnce(above=0), with_kwargs=True)
    reports = []
    fit(hit, report=lambda metrics, checkpoint: reports.append(metrics))
    hook.remove()
    fit(calm)
    assert worst_gap(snapshot(hit), snapshot(calm)) <= 1e-5
    assert hit.halving.retries == 1 and hit.halving.pieces == 2
    assert reports[0]["oom_retries"] == 1 and calm.history[0]["oom_retries"] == 0
    assert reports[0]["tokens_per_batch"] < calm.history[0]["tokens_per_batch"]


def test_an_out_of_memory_step_of_single_examples_still_fails():
    run = setup(tiny("data.batch_size=1", "model.lora.enabled=true"))
    run.model.get_base_model().model.register_forward_pre_hook(OutOfMemoryOnce(above=0, times=5), with_kwargs=True)
    with pytest.raises(torch.OutOfMemoryError):
        train_step(run, epoch_windows(run, 0)[0])


def test_the_budget_probe_keeps_the_largest_power_of_two_that_fits():
    run = setup(tiny())
    base = run.model.model
    base.register_forward_pre_hook(OutOfMemoryOnce(above=1000, times=99), with_kwargs=True)

    def try_tokens(tokens: int) -> int:
        batch = collate([torch.randint(4, 90, (100,)) for _ in range(tokens // 100)],
                        [torch.randint(4, 90, (100,)) for _ in range(tokens // 100)], 0)
        model_loss(run.model, batch, 1).backward()
        return tokens * 1000  # bytes: a stand-in for CUDA's peak, to check the memory share rule

    assert probe_budget(try_tokens, max_length=100, memory_bytes=10**9, reserved_bytes=0) == 800
    assert probe_budget(try_tokens, max_length=100, memory_bytes=10**6, reserved_bytes=0) == 800
    assert probe_budget(try_tokens, max_length=100, memory_bytes=4 * 10**5, reserved_bytes=0) == 200
    assert probe_budget(try_tokens, max_length=100, memory_bytes=4 * 10**5, reserved_bytes=10**6) == 100


def test_evaluation_batches_are_packed_too_and_give_the_padded_loss():
    packed, padded = setup(tiny("data.packing=true")), setup(tiny("data.packing=false"))
    from tune_llama.loop import validation_loss
    assert validation_loss(packed) == pytest.approx(validation_loss(padded), abs=1e-5)
    batches = make_batches(packed.val_set, packed.spec.data, 0, seed=0, epoch=0, shuffle=False, pack=True)
    assert batches and all("attention_mask" not in b for b in batches)


def test_a_one_row_run_trains_and_evaluates_on_single_rows_to_the_padded_figures():
    """The loop packs one row per micro-batch for flex_attention (a GPU choice: no backward on CPU); the
    same layout under sdpa must train and measure as the padded path does."""
    import dataclasses
    from tune_llama.loop import validation_loss
    common = ["training.epochs=1", "training.optimizer=sgd", "training.lr=0.5", "model.lora.enabled=true",
              "training.gradient_accumulation_steps=2", "data.batch_size=3"]
    one_row, padded = setup(tiny(*common)), setup(tiny(*common, "data.packing=false"))
    one_row = dataclasses.replace(one_row, one_row=True)
    assert validation_loss(one_row) == pytest.approx(validation_loss(padded), abs=1e-5)
    windows = epoch_windows(one_row, 0)
    assert all(len(b["input_ids"]) == 1 for window in windows for b in window)
    for run, steps in ((one_row, windows), (padded, epoch_windows(padded, 0))):
        for window in steps:
            train_step(run, window)
    assert worst_gap(snapshot(one_row), snapshot(padded)) <= 1e-5
