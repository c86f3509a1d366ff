"""A regression guard on the numbers: tiny.yaml's first validation losses, fixed to 1e-4.

Any change to data generation, encoding, batching, initialisation, the loss
normalisation or the optimizer step moves these. When a change is meant to,
regenerate them with

    .venv/bin/python -c "from tune_llama.loop import fit, setup; from tune_llama.spec import load_spec; \\
        print([round(m['eval_loss'], 6) for m in fit(setup(load_spec('search_spaces/tiny.yaml', \\
        ['training.epochs=2']))).history])"

and say why in the commit message.
"""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT
from tune_llama.loop import fit, setup
from tune_llama.spec import load_spec

GOLDEN_EVAL_LOSS = [3.508032, 2.911006]  # tiny.yaml, training.epochs=2: after epoch 1 and epoch 2


def test_tiny_spec_validation_losses_match_the_golden_values():
    run = fit(setup(load_spec(REPO_ROOT / "search_spaces" / "tiny.yaml", ["training.epochs=2"])))
    assert [m["eval_loss"] for m in run.history] == pytest.approx(GOLDEN_EVAL_LOSS, abs=1e-4)
