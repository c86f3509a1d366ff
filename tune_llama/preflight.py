"""Everything a search can check before Ray starts, so bad input fails in seconds with one line.

``preflight(spec)`` reads the data end to end, loads the tokenizer, encodes
every example under the over-length policy (the encode cache then serves the
trials the same tensors), and resolves the model's config without loading its
weights. ``check_cluster`` runs after ``ray.init``: a trial that no node can
hold would otherwise wait forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tune_llama.errors import SpecError, UserError
from tune_llama.model import EMBEDDED, SHAPES, embedded_checkpoint, load_tokenizer
from tune_llama.spec import ModelSpec, Spec


@dataclass
class Checked:
    """What preflight loaded: a run in this process (``train``) starts from it instead of loading it again."""
    tokenizer: Any
    train: Any
    val: Any
    """The encoded train and validation sets (``tune_llama.data.Encoded``)."""


def preflight(spec: Spec) -> Checked:
    from tune_llama.loop import encode_splits
    check_model(spec.model)
    tokenizer = load_tokenizer(spec.model)
    return Checked(tokenizer, *encode_splits(spec, tokenizer))


def check_model(model: ModelSpec) -> None:
    """The model name resolves to a config (no weights are loaded)."""
    name = model.name
    if name.startswith("random:"):
        if name.split(":", 1)[1] not in SHAPES:
            raise SpecError("model.name", f"unknown random shape {name!r} (known: {', '.join(SHAPES)})")
        return
    if name == EMBEDDED:
        embedded_checkpoint()
        return
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=model.trust_remote_code)
    except Exception as err:  # not found, offline, gated, malformed: all one line naming the model
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SpecError("model.name", f"cannot load the config of {name!r}: {reason}") from None


def check_cluster(resources: dict[str, float]) -> None:
    """A trial's resources must fit on one alive node of the Ray cluster we joined."""
    import ray
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if all(n.get(k.upper(), 0) >= v for k, v in resources.items() if v)]
    if fits:
        return
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise UserError(f"search.resources: each trial asks for cpu={resources.get('cpu', 0):g}, "
                    f"gpu={resources.get('gpu', 0):g}, but the largest node offers "
                    f"cpu={largest.get('CPU', 0):g}, gpu={largest.get('GPU', 0):g}: lower search.resources")
