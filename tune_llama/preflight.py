"""Everything a search can check without Ray, so bad input fails in seconds with one line.

``preflight(spec)`` reads the data end to end, loads the tokenizer, encodes
every example under the over-length policy (the encode cache then serves the
trials the same tensors), and resolves the model's config without loading its
weights. ``check_cluster`` runs after ``ray.init``: a trial that no node can
hold would otherwise wait forever, and it caps how many trials run at once.
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tune_llama.errors import SpecError, UserError
from tune_llama.model import EMBEDDED, SHAPES, embedded_checkpoint, load_tokenizer
from tune_llama.paths import missing_folder
from tune_llama.resources import RAY_NAMES, ray_resources, resources_text, worker_resources
from tune_llama.spec import ModelSpec, Spec, apply_params


@dataclass
class TokenizedData:
    """What preflight loaded: a run in this process (``train``) starts from it instead of loading it again."""
    tokenizer: Any
    train: Any
    val: Any
    """The encoded train and validation sets (``tune_llama.data.Encoded``)."""


def preflight(spec: Spec) -> TokenizedData:
    from tune_llama.loop import encode_splits
    check_model(spec.model)
    tokenizer = check_tokenizer(spec.model)
    checked = TokenizedData(tokenizer, *encode_splits(spec, tokenizer))
    for note in eval_every_notes(spec, checked.train):
        print(f"note: {note}", file=sys.stderr, flush=True)
    return checked


STEP_FIELDS = ("data.batch_size", "training.gradient_accumulation_steps")
"""The fields that set how many optimizer steps an epoch has."""


def eval_every_notes(spec: Spec, train: Any) -> list[str]:
    """One line per setting of ``STEP_FIELDS`` (each value the search may draw) whose epoch has fewer
    optimizer steps than a fractional ``training.eval_every`` asks to report: such trials report less
    often, and ASHA has fewer rungs to compare. Said once per cause, before any trial starts."""
    from tune_llama.data import count_batches
    from tune_llama.loop import report_points
    t = spec.training
    wanted = round(1 / t.eval_every) if t.eval_every < 1 else 1
    if wanted <= 1:
        return []
    notes = []
    for setting in step_settings(spec):
        trial = apply_params(spec, setting)
        per_epoch = max(1, math.ceil(count_batches(train, trial.data) / trial.training.gradient_accumulation_steps))
        if per_epoch >= wanted:
            continue
        reports = len([s for s in report_points(trial.training, per_epoch) if s <= per_epoch])
        who = ("trials with " + ", ".join(f"{k}={v}" for k, v in setting.items())) if setting else "each trial"
        notes.append(f"{who} {'have' if setting else 'has'} {per_epoch} optimizer step{'s' * (per_epoch != 1)} "
                     f"per epoch; {'they' if setting else 'it'} report{'' if setting else 's'} "
                     f"{'once' if reports == 1 else f'{reports} times'} per epoch, not the {wanted} times "
                     f"training.eval_every={t.eval_every:g} asks for")
    return notes


def step_settings(spec: Spec) -> list[dict[str, Any]]:
    """Every combination of the values the search draws for ``STEP_FIELDS`` (none searched: one, empty)."""
    choices = []
    for key in STEP_FIELDS:
        dist = spec.search.space.get(key)
        if dist is None:
            continue
        (kind, args), = dist.items()
        values = list(args) if kind == "choice" else list(range(int(args[0]), int(args[1]) + 1)) \
            if kind == "int" else []
        choices.append([(key, v) for v in values])
    return [dict(combo) for combo in itertools.product(*choices)]


def check_storage(storage: Path) -> None:
    """The folder that holds searches can be created and takes a file, or one line naming it.

    Folders made for the check are removed again: input refused later (preflight) leaves nothing behind.
    """
    missing = [p for p in (storage, *storage.parents) if not p.exists()]
    try:
        storage.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".tune-llama-write-check-"):
            pass
    except OSError as err:
        raise UserError(f"--storage {storage}: cannot create or write there ({err.strerror or err})") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


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
    for field, value in (("model.name", name), ("model.tokenizer", model.tokenizer)):
        missing = missing_folder(value) if value else None
        if missing is not None:
            raise SpecError(field, f"directory not found: {missing}")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name, trust_remote_code=model.trust_remote_code)
    except Exception as err:  # not found, offline, gated, malformed: all one line naming the model
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SpecError("model.name", f"cannot load the config of {name!r}: {reason}") from None


def check_tokenizer(model: ModelSpec):
    """The tokenizer, loaded; or one line naming the field it comes from."""
    try:
        return load_tokenizer(model)
    except (OSError, ValueError) as err:  # not found, offline, not a tokenizer folder: one line naming it
        field = "model.tokenizer" if model.tokenizer else "model.name"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SpecError(field, f"cannot load the tokenizer {model.tokenizer or model.name!r}: {reason}") from None


def check_cluster(spec: Spec, nodes: Optional[list[dict[str, float]]] = None) -> int:
    """How many trials may run at once on the Ray cluster we joined (``nodes``: each alive node's resources,
    as ``ray.nodes()`` gives them), or one line naming ``search.resources`` when a trial cannot run.

    Each training process (the trial, or each of its workers) must fit on one node, and all of a trial's
    workers on the cluster at once. ``search.max_concurrent`` is capped by the latter: Tune cannot see Ray
    Train's workers, so this is the only cap on multi-worker trials.
    """
    if nodes is None:
        import ray
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    each, workers = worker_resources(spec), spec.search.resources.workers
    if not any(all(n.get(k, 0) >= v for k, v in ray_resources(each).items()) for n in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0), n.get("memory", 0)), default={})
        raise UserError(f"search.resources: each {'worker' if workers > 1 else 'trial'} asks for "
                        f"{resources_text(each)}, but the largest node offers "
                        f"{resources_text({k: largest.get(RAY_NAMES[k], 0) for k in each})}: lower search.resources")
    if workers == 1:
        return spec.search.max_concurrent
    kind = "gpu" if each["gpu"] else "cpu"
    total = sum(n.get(RAY_NAMES[kind], 0) for n in nodes)
    fits = int(total // (each[kind] * workers))
    if fits < 1:
        raise UserError(f"search.resources: a trial's {workers} workers take {kind}={each[kind] * workers:g} in "
                        f"all, but the cluster has {kind}={total:g}: lower search.resources.workers or "
                        f"search.resources.{kind}")
    return min(spec.search.max_concurrent, fits)
