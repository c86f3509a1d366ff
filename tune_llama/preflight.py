"""Everything a search can check without Ray, so bad input fails in seconds with one line.

``check_inputs(spec)`` runs before Ray starts (a second or a few): the local paths, the refusals the loop and
model make at setup (``check_setup``: the device, the attention kernel, quantization, 8-bit AdamW and liger
without CUDA or their package; for the spec and each value a ``choice`` in its space may draw), the data read
end to end, the tokenizer, and every example encoded under ``data.max_length`` and ``data.overlong`` (the
encode cache then serves the trials the same tensors; too much of the training split dropped is refused).
``check_model_setup(spec)`` reads the model's config (no weights loaded) and checks what the model's shape
decides (LoRA's target modules, liger's model type, FSDP's layers) on a model built on the meta device: before
Ray too for a model in local files, while Ray starts for a hub id (its config may wait on the network).
``preflight`` is both, for ``train``. ``check_cluster`` runs after ``ray.init``: a trial that no node can
hold would otherwise wait forever, and it caps how many trials run at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from tune_llama.errors import SpecError, UserError
from tune_llama.model import EMBEDDED, SHAPES, cuda_package, embedded_checkpoint, load_tokenizer
from tune_llama.paths import missing_folder, relative_note
from tune_llama.resources import RAY_NAMES, ray_resources, resources_text, worker_resources
from tune_llama.spec import ModelSpec, Spec, apply_params


@dataclass
class TokenizedData:
    """What preflight loaded: a run in this process (``train``) starts from it instead of loading it again."""
    tokenizer: Any
    train: Any
    val: Any
    """The encoded train and validation sets (``tune_llama.data.Encoded``)."""
    model_checked: bool = False
    """Whether ``check_model_setup`` ran too (a model read from local files), or is left to overlap Ray's start."""


def preflight(spec: Spec, spec_file: Optional[str] = None, search: bool = False) -> TokenizedData:
    """Every check, in this process: ``check_inputs``, then ``check_model_setup`` when it did not run it."""
    checked = check_inputs(spec, spec_file, search)
    if not checked.model_checked:
        check_model_setup(spec)
    return checked


def check_inputs(spec: Spec, spec_file: Optional[str] = None, search: bool = False) -> TokenizedData:
    """The checks cheap enough to run before Ray starts; the data, tokenizer and encoded examples they load.
    ``spec_file``: where the spec was read from, named when a relative path is not found; ``search``: the
    trials run where Ray puts them (``search.resources`` says whether they get a GPU), not in this process."""
    check_paths(spec, spec_file)
    check_setup(spec, search)
    tokenizer = check_tokenizer(spec.model)
    from tune_llama.data import load_splits
    from tune_llama.data.cache import encode_cached
    splits = load_splits(spec.data)
    with quiet_overlong_warning():  # overlong_note says it, with what to set
        try:
            train = encode_cached(splits.train, tokenizer, spec.data)
        except SpecError as err:  # every example dropped, or one over it with data.overlong=error
            if err.path != "data.max_length":
                raise
            raise SpecError(err.path, f"{err.message}; {length_that_keeps(splits.train, tokenizer, spec)}") from None
        checked = TokenizedData(tokenizer, train, encode_cached(splits.val, tokenizer, spec.data))
    notes = [overlong_note(spec, splits.train, checked), *eval_every_notes(spec, checked.train)]
    for note in filter(None, notes):
        print(f"note: {note}", file=sys.stderr, flush=True)
    if not from_the_hub(spec.model):  # local files: a second at most; a hub id's config overlaps Ray's start
        check_model_setup(spec)
        checked.model_checked = True
    return checked


def from_the_hub(model: ModelSpec) -> bool:
    """Whether the model's config comes from the hub (a hub id, not a random shape, the embedded model or a
    local folder): the one check that may wait on the network."""
    name = model.name
    return not (name.startswith("random:") or name == EMBEDDED or Path(name).expanduser().is_dir())


def check_model_setup(spec: Spec) -> None:
    """The model's config resolves (no weights loaded), and what its shape decides fits the spec and each
    searched choice: ``model.lora.target_modules`` name its modules, ``model.kernels: liger`` a Llama, and
    ``training.parallel: fsdp`` over several workers a model with a decoder layer list."""
    config = check_model(spec.model)
    model = None
    for key, value, trial in variants(spec):
        with naming(key, value):
            if trial.model.kernels == "liger" and config.model_type != "llama":
                raise SpecError("model.kernels", f"liger is wired for Llama models here, not {config.model_type!r}")
            fsdp = trial.training.parallel == "fsdp" and trial.search.resources.workers > 1
            if not (trial.model.lora.enabled or fsdp):
                continue
            model = model or meta_model(trial.model, config)
            names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            missing = [m for m in trial.model.lora.target_modules if m not in names]
            if trial.model.lora.enabled and missing:
                raise SpecError("model.lora.target_modules",
                                f"no module named {', '.join(missing)} in {spec.model.name}")
            if fsdp:
                from tune_llama.distributed import decoder_layers
                decoder_layers(model)


# ---------------------------------------------------------------- the refusals the loop and model make at setup

def check_paths(spec: Spec, spec_file: Optional[str] = None) -> None:
    """Each local folder the spec names exists; a relative one not found says what it was resolved against."""
    for field, value in (("model.name", spec.model.name), ("model.tokenizer", spec.model.tokenizer),
                         ("data.source", spec.data.source)):
        if value and missing_folder(value) is not None:  # named as written (./data stays ./data), ~ expanded
            raise SpecError(field, f"directory not found: {os.path.expanduser(value)}{relative_note(value, spec_file)}")


def trial_device(spec: Spec, search: bool):
    """The device a trial trains on: here, what ``training.device`` picks (``loop.pick_device``, with its
    refusal); in a search, CUDA exactly when ``search.resources`` gives a trial a GPU (Ray hides the GPUs of
    a trial that asks for none), which ``check_cluster`` checks once Ray is up."""
    import torch
    from tune_llama.loop import pick_device
    choice = spec.training.device
    if not search:
        return pick_device(choice)
    gpu = worker_resources(spec)["gpu"] > 0
    if choice == "cuda" and not gpu:
        why = "search.resources.gpu=0 gives trials none" if torch.cuda.is_available() else "no GPU is visible"
        raise SpecError("training.device", f"cuda was asked for but {why}")
    return torch.device("cuda" if gpu and choice != "cpu" else "cpu")


def check_setup(spec: Spec, search: bool = False) -> None:
    """Each refusal ``loop.setup`` and ``model.load_model`` make before the model loads, made here first, for
    the spec and for each value a ``choice`` of its space may draw (one line naming ``search.space.KEY``): a
    value that breaks every trial fails in a second, not once per trial until ``stop_after_same_error``."""
    from tune_llama.kernels import check_attention
    for key, value, trial in variants(spec):
        with naming(key, value):
            device = trial_device(trial, search)
            check_attention(trial, device)
            if trial.model.quantization != "none":
                cuda_package("model.quantization", f"{trial.model.quantization} quantization", "bitsandbytes",
                             device, fallback="model.quantization=none")
            if trial.training.optimizer == "adamw_8bit":
                cuda_package("training.optimizer", "adamw_8bit", "bitsandbytes", device,
                             fallback="training.optimizer=adamw")
            if trial.model.kernels == "liger":
                cuda_package("model.kernels", "liger's Triton kernels", "liger_kernel.transformers", device,
                             fallback="model.kernels=none", install="'tune-llama[kernels]'")


def variants(spec: Spec) -> Iterator[tuple[Optional[str], Any, Spec]]:
    """(None, None, the spec), then (KEY, value, the spec with it) for each value of each ``choice`` in the
    space: the searched values that can make a setup refusal are categorical (an optimizer, a kernel)."""
    yield None, None, spec
    for key, dist in spec.search.space.items():
        (kind, args), = dist.items()
        for value in args if kind == "choice" else []:
            with naming(key, value):
                trial = apply_params(spec, {key: value})
            yield key, value, trial


@contextlib.contextmanager
def naming(key: Optional[str], value: Any):
    """A refusal of a searched choice names the space's key and the value: a trial that draws it fails so."""
    try:
        yield
    except SpecError as err:
        if key is None:
            raise
        raise SpecError(f"search.space.{key}", f"{value!r} is refused: {err}") from None


def meta_model(model: ModelSpec, config: Any):
    """The model's modules without its weights (the meta device: no memory, no file read)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


# ---------------------------------------------------------------- over-length examples

MAX_LENGTH_KEEPS = 0.99
"""The share of examples the suggested ``data.max_length`` keeps whole."""


def overlong_note(spec: Spec, problems: list[dict[str, str]], checked: TokenizedData) -> Optional[str]:
    """What ``data.max_length`` cuts of each split and the smallest one that keeps ``MAX_LENGTH_KEEPS`` of the
    training examples whole, as one line; or a SpecError when more than ``data.max_dropped_share`` of the
    training split is dropped (a search on what is left trains on a different data set)."""
    data, train, val = spec.data, checked.train, checked.val
    if not (train.truncated or train.dropped or val.truncated or val.dropped):
        return None
    total = len(train) + train.dropped
    suggestion = length_that_keeps(problems, checked.tokenizer, spec)
    if train.dropped > data.max_dropped_share * total:
        raise SpecError("data.max_length", f"{data.max_length} drops {train.dropped} of {total} training examples "
                                           f"({train.dropped / total:.0%}, over data.max_dropped_share="
                                           f"{data.max_dropped_share:g}; data.overlong={data.overlong}); "
                                           f"{suggestion}: raise it, or set data.max_dropped_share: 1 to train "
                                           f"on the rest")
    cut = train.truncated + train.dropped
    return (f"data.max_length={data.max_length} cuts {cut} of {total} training examples ({cut / total:.0%}: "
            f"{train.truncated} truncated, {train.dropped} dropped; data.overlong={data.overlong}) and "
            f"{val.truncated + val.dropped} of {len(val) + val.dropped} validation examples; {suggestion}")


def length_that_keeps(problems: list[dict[str, str]], tokenizer: Any, spec: Spec) -> str:
    """``data.max_length=374 keeps 99% of them whole``: the smallest that keeps ``MAX_LENGTH_KEEPS`` of the
    examples neither truncated nor dropped."""
    lengths = sorted(full_lengths(problems, tokenizer, spec))
    keeps = lengths[max(0, math.ceil(MAX_LENGTH_KEEPS * len(lengths)) - 1)]
    return f"data.max_length={keeps} keeps {MAX_LENGTH_KEEPS:.0%} of them whole"


def full_lengths(problems: list[dict[str, str]], tokenizer: Any, spec: Spec) -> list[int]:
    """Each example's tokens before ``data.max_length`` cuts it, counted as ``data.examples.encode`` builds it:
    BOS when the tokenizer adds one, the prompt, the answer, EOS."""
    from tune_llama.data import format_prompt
    from tune_llama.data.examples import adds_bos
    prompts = tokenizer([format_prompt(spec.data.prompt_template, p["question"]) for p in problems],
                        add_special_tokens=False).input_ids
    answers = tokenizer([p["answer"] for p in problems], add_special_tokens=False).input_ids
    extra = 1 + adds_bos(tokenizer)
    return [len(p) + len(a) + extra for p, a in zip(prompts, answers)]


@contextlib.contextmanager
def quiet_overlong_warning():
    """Without the encoder's own over-length warning, which ``overlong_note`` replaces."""
    logger = logging.getLogger("tune_llama.data.examples")
    drop = lambda record: "longer than data.max_length" not in record.getMessage()  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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


def check_model(model: ModelSpec) -> Any:
    """The model's config (no weights are loaded; a random shape's is built in code)."""
    name = model.name
    if name.startswith("random:"):
        if name.split(":", 1)[1] not in SHAPES:
            raise SpecError("model.name", f"unknown random shape {name!r} (known: {', '.join(SHAPES)})")
        from transformers import LlamaConfig
        return LlamaConfig(**SHAPES[name.split(":", 1)[1]])
    for field, value in (("model.name", name), ("model.tokenizer", model.tokenizer)):
        missing = missing_folder(value) if value else None
        if missing is not None:
            raise SpecError(field, f"directory not found: {missing}{relative_note(value)}")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(embedded_checkpoint()) if name == EMBEDDED else name,
                                          trust_remote_code=model.trust_remote_code)
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
