"""Answer-only, chunked logits: the same loss and gradients as the model's own loss, without the full logits."""

from __future__ import annotations

import pytest

from conftest import TINY
from tune_llama.loop import epoch_windows, label_count, setup
from tune_llama.loss import answer_only_loss, model_loss
from tune_llama.spec import load_spec


@pytest.mark.parametrize("lora", [False, True])
def test_answer_only_chunked_loss_and_gradients_equal_the_plain_path(lora):
    run = setup(load_spec(TINY, [f"model.lora.enabled={str(lora).lower()}", "data.synthetic_size=24",
                                 "data.val_size=4", "model.lora.dropout=0.0"]))
    (batch,) = epoch_windows(run, 0)[0]
    n = label_count(batch)
    params = [p for p in run.model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        run.model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    plain, plain_grads = loss_and_grads(lambda: model_loss(run.model, batch, n))
    ours, our_grads = loss_and_grads(lambda: answer_only_loss(run.model, batch, n, chunk=37))
    assert ours == pytest.approx(plain.item(), abs=1e-5)
    worst = max((a - b).abs().max().item() for a, b in zip(our_grads, plain_grads))
    assert worst <= 1e-5, f"gradients differ by {worst}"
    assert max(g.abs().max().item() for g in plain_grads) > 1e-4, "the comparison must see real gradients"


def test_no_more_than_a_chunk_of_logit_rows_is_computed_at_once():
    run = setup(load_spec(TINY, ["data.synthetic_size=24", "data.val_size=4"]))
    (batch,) = epoch_windows(run, 0)[0]
    head = run.model.get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda module, inputs, output: rows.append(output.shape[0]))
    try:
        answer_only_loss(run.model, batch, label_count(batch), chunk=50).backward()
    finally:
        handle.remove()
    assert rows and max(rows) <= 50
    assert sum(rows) == 2 * label_count(batch), "every labelled position once forward, once recomputed"
