"""The worker side of trials larger than one process: N data-parallel workers (DDP or FSDP2) over the plain
loop. Ray Train (V2) launches them from inside the Tune trial (``tune_llama.trainable.train_trial_on_workers``).

``search.resources.workers: N`` gives each trial N workers, each with ``search.resources.cpu`` CPUs and
``search.resources.gpu`` GPUs. The Tune trial itself is only a driver (no resources of its own): it starts a
``TorchTrainer`` whose workers Ray places with one placement group, and Ray's ``TuneReportCallback`` forwards
rank 0's reports to Tune, so OptunaSearch and ASHA see an ordinary trial. Ray Train writes its checkpoints
into the Tune trial's own folder (the Train run *is* the trial folder), so the search folder looks as it
does for one-process trials, and a retried trial (``search.max_failures``) resumes from Train's latest one.

The maths (``training.parallel``):

- ``data.batch_size`` is per worker. Every worker cuts the epoch into the same global micro-batches of
  ``batch_size x N`` rows (one process with that batch size would see exactly these) and trains on rows
  ``rank, rank + N, ...`` of each. So batch 4 on each of 2 workers is the same update as batch 8 on one.
- The loop normalises a step's loss by the label tokens of the whole step on all workers
  (``TrainingRun.sum_across_workers`` is an all-reduce), so the gradients must be *summed* over workers, not
  averaged as DDP and FSDP do by default: DDP gets a summing communication hook, FSDP a divide factor of 1.
- DDP all-reduces once per optimizer step (the window's last micro-batch); FSDP reduce-scatters after every
  micro-batch, so unsharded gradients never accumulate.
- A worker whose share of a micro-batch is empty (a short last batch) still runs a zero-weighted forward,
  so every worker joins every collective.

Checkpoints: DDP (LoRA or full) -- rank 0 writes the loop's own checkpoint (the adapter for LoRA); FSDP --
the trainable weights and the optimizer as a sharded ``torch.distributed.checkpoint`` (each worker writes
its shard; for LoRA rank 0 also writes the whole adapter, so export works as for one process), and
``consolidate`` turns a sharded one into ordinary safetensors. Every worker also saves its own RNG state,
so a resume with the same number of workers is exact; a checkpoint written by another number of workers
is refused with one line (the global batch, hence the step count, would differ).

Nothing here imports Ray: these functions only need ``torch.distributed`` to be initialised.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tune_llama import checkpoint, kernels
from tune_llama.data import make_batches
from tune_llama.errors import SpecError
from tune_llama.loop import (DataParallelHooks, Interval, TrainingRun, Window, build_optimizer, build_scheduler, fit,
                             setup)
from tune_llama.loss import answer_only_loss, decoder_and_head
from tune_llama.spec import Spec, TrainingSpec


# ---------------------------------------------------------------- who we are

@dataclass
class Team:
    """This worker's place among the trial's workers, and the collectives the loop needs."""
    rank: int
    world: int
    device: torch.device
    """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
    parallel: str

    @classmethod
    def current(cls, parallel: str) -> "Team":
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device, parallel)

    def reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum_count(self, n: int) -> int:
        return int(self.reduce([n])[0])

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every worker."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------- data: one global batch, a row stride each

def global_spec(spec: Spec, world: int) -> Spec:
    """The spec one process would need to see what ``world`` workers see together: ``world`` times the rows
    (and token budget) per micro-batch. Evaluation batches stay per worker: each worker validates alone."""
    data = spec.data
    scaled = replace(data, batch_size=data.batch_size * world,
                     packing=data.packing and kernels.packing_supported(spec, world)[0],
                     eval_batch_size=data.eval_batch_size or data.batch_size,
                     max_tokens_per_batch=data.max_tokens_per_batch * world if data.max_tokens_per_batch else None)
    return replace(spec, data=scaled)


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rows ``rank, rank + world, ...`` of a global micro-batch (long and short rows spread evenly), cut to the
    longest of them: batches are right-padded, so the columns dropped hold padding only."""
    rows = {k: v[rank::world] for k, v in batch.items()}
    width = int(rows["attention_mask"].sum(dim=1).max()) if rows["attention_mask"].shape[0] else 1
    return {k: v[:, :width].contiguous() for k, v in rows.items()}


def worker_windows(run: TrainingRun, team: Team, data_spec, epoch: int) -> list[Window]:
    """This worker's share of every optimizer step of ``epoch``: the same steps on every worker."""
    batches = make_batches(run.train_set, data_spec, run.tokenizer.pad_token_id, seed=run.spec.training.seed,
                           epoch=epoch)
    shards = [shard(b, team.rank, team.world) for b in batches]
    accum = run.spec.training.gradient_accumulation_steps
    return [shards[i:i + accum] for i in range(0, len(shards), accum)]


# ---------------------------------------------------------------- the model: loss as one forward, summed grads

class MicroBatchLoss(torch.nn.Module):
    """The loop's micro-batch loss as one module's forward, so DDP and FSDP see every micro-batch pass through
    the module they wrap (the answer-only loss calls the decoder and the LM head separately)."""

    def __init__(self, inner: torch.nn.Module, training: TrainingSpec, pad_id: int):
        super().__init__()
        self.inner = inner  # not ``model``: tune_llama.loss must not mistake this wrapper for a HF model
        self.answer_only, self.chunk, self.pad_id = training.answer_only_logits, training.loss_chunk_tokens, pad_id
        self.pending = 0
        """Micro-batches left in the current optimizer step (DDP syncs on the last)."""

    def forward(self, input_ids, attention_mask, labels, num_items_in_batch):
        from transformers.modeling_outputs import CausalLMOutput
        if input_ids.shape[0] == 0:
            return CausalLMOutput(loss=self.zero_loss(input_ids.device))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.answer_only:
            return CausalLMOutput(loss=answer_only_loss(self.inner, batch, num_items_in_batch, chunk=self.chunk))
        return CausalLMOutput(loss=self.inner(**batch, num_items_in_batch=num_items_in_batch).loss)

    def zero_loss(self, device: torch.device) -> torch.Tensor:
        """A loss of exactly 0 that still runs every weight, for a worker with no rows in this micro-batch:
        its collectives (DDP's all-reduce, FSDP's all-gathers) must match the other workers'."""
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        parts = decoder_and_head(self.inner) if self.answer_only else None
        if parts is None:
            logits = self.inner(input_ids=ids, attention_mask=mask).logits
        else:
            logits = parts[1](parts[0](input_ids=ids, attention_mask=mask).last_hidden_state)
        return logits.float().sum() * 0.0


def _sum_allreduce_hook(process_group, bucket):
    """DDP's all-reduce without the division by the world size (the loss is already globally normalised)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def make_ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class StepDDP(DistributedDataParallel):
        """DDP that all-reduces only on the last micro-batch of an optimizer step (``pending`` counts them)."""

        def forward(self, *args, **kwargs):
            if torch.is_grad_enabled() and self.training:
                self.require_backward_grad_sync = self.module.pending <= 1
                self.module.pending -= 1
            return super().forward(*args, **kwargs)

    return StepDDP


def decoder_layers(inner: torch.nn.Module) -> list[torch.nn.Module]:
    layers = kernels.decoder_layers(inner)
    if layers is None:
        raise SpecError("training.parallel", f"fsdp shards decoder layers, and {type(inner).__name__} has none "
                                             "(model.layers); use ddp")
    return list(layers)


def wrap(run: TrainingRun, team: Team) -> None:
    """Wrap ``run.model`` for data parallelism; FSDP shards parameters, so the optimizer is rebuilt over them."""
    loss = MicroBatchLoss(run.model, run.spec.training, run.tokenizer.pad_token_id)
    if team.parallel == "ddp":
        ids = [run.device.index if run.device.index is not None else torch.cuda.current_device()] \
            if run.device.type == "cuda" else None
        ddp = make_ddp_class()
        # Buffers (rotary tables) are the same on every worker: no broadcast before each forward.
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters \
            else "broadcast_buffers"
        run.model = ddp(loss, device_ids=ids, gradient_as_bucket_view=True, **{quiet: False})
        run.model.register_comm_hook(None, _sum_allreduce_hook)
        return
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    precision = kernels.AUTOCAST.get(run.spec.training.precision)
    policy = MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32) if precision else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(run.model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(loss, mp_policy=policy)
    for module in loss.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: see the module docstring
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    run.model = loss
    run.optimizer = build_optimizer(run.model, run.spec, run.device)
    run.scheduler = build_scheduler(run.optimizer, run.spec, run.total_steps)


def inner_model(run: TrainingRun) -> torch.nn.Module:
    model = run.model.module if hasattr(run.model, "module") else run.model
    return model.inner if isinstance(model, MicroBatchLoss) else model


def micro_batch_loss(run: TrainingRun) -> MicroBatchLoss:
    return run.model.module if hasattr(run.model, "module") else run.model


# ---------------------------------------------------------------- setup and the training loop

def setup_workers(spec: Spec) -> tuple[TrainingRun, Team]:
    """This worker's run: the loop's ``setup`` at the global batch size, then wrapped for ``training.parallel``.

    Every worker builds the same initial weights from ``training.seed``; dropout then draws from a
    per-worker stream, so workers do not drop the same units of different rows.
    """
    team = Team.current(spec.training.parallel)
    run = setup(global_spec(spec, team.world))
    run.spec = spec  # the trial's own spec: per-worker batch size, written into every checkpoint
    run.sum_across_workers = team.sum_count
    run.halving.enabled = False  # a retry on one worker alone would leave the others' collectives waiting
    wrap(run, team)
    if team.rank:
        torch.manual_seed(spec.training.seed + 7919 * team.rank)
    return run, team


class TeamHooks(DataParallelHooks):
    """``loop.fit`` as one worker of N: the same report points, with the interval's loss, tokens and time
    combined over the workers first, so every worker reports (and decides) the same thing."""

    def __init__(self, run: TrainingRun, team: Team):
        self.team, self.data_spec = team, global_spec(run.spec, team.world).data

    def windows(self, run: TrainingRun, epoch: int) -> list[Window]:
        return worker_windows(run, self.team, self.data_spec, epoch)

    def before_step(self, run: TrainingRun, window: Window) -> None:
        micro_batch_loss(run).pending = len(window)

    def loss_sum(self, interval: Interval) -> float:
        return self.team.reduce([float(interval.loss_sum)])[0]

    def combine(self, run: TrainingRun, interval: Interval) -> None:
        """Loss and tokens summed, time the slowest worker's; the run's token and example counts become the
        trial's (they are saved, and a resume continues from them)."""
        loss, real, examples = self.team.reduce([float(interval.loss_sum), interval.real_tokens,
                                                 interval.examples])
        run.tokens_seen += int(real) - interval.real_tokens
        run.examples_seen += int(examples) - interval.examples
        interval.loss_sum = torch.tensor(loss, device=run.device)
        interval.real_tokens, interval.examples = int(real), int(examples)
        interval.seconds = self.team.reduce([interval.seconds], op=dist.ReduceOp.MAX)[0]

    def agree(self, run: TrainingRun) -> None:
        run.status = self.team.broadcast(run.status)


def fit_workers(run: TrainingRun, team: Team, save_checkpoint=None, report=None) -> TrainingRun:
    """``loop.fit`` for one worker of N (see ``TeamHooks``)."""
    return fit(run, save_checkpoint, report, workers=TeamHooks(run, team))


# ---------------------------------------------------------------- checkpoints (the layout is tune_llama.checkpoint's)

def save_worker_state(run: TrainingRun, team: Team, directory: Path) -> Path:
    """This worker's part of a checkpoint into ``directory`` (under Ray Train, each worker's folder is merged
    into one checkpoint). Collective under FSDP: every worker must call it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.save_worker_rng(directory, team.rank)
    if team.parallel == "fsdp":
        checkpoint.save_sharded(run, directory, team.rank)
    elif team.rank == 0:
        with model_swapped(run, inner_model(run)):
            checkpoint.save_state(run, directory)
    if team.rank == 0:
        checkpoint.write_workers(directory, team.world, team.parallel)
    return directory


def load_worker_state(run: TrainingRun, team: Team, directory: Path) -> TrainingRun:
    """Restore what ``save_worker_state`` wrote, on every worker; another worker count is one-line refused."""
    directory = Path(directory)
    checkpoint.check_workers(directory, team.world, team.parallel)
    if team.parallel == "fsdp":
        checkpoint.load_sharded(run, directory)
    else:
        with model_swapped(run, inner_model(run)):
            checkpoint.load_state(run, directory)
    checkpoint.load_worker_rng(directory, team.rank)
    return run


@contextlib.contextmanager
def model_swapped(run: TrainingRun, model: torch.nn.Module):
    """``run.model`` temporarily the plain model, so the one-process save/load see the one-process names."""
    wrapped, run.model = run.model, model
    try:
        yield
    finally:
        run.model = wrapped


def trainable_weights(run: TrainingRun, team: Team) -> dict[str, torch.Tensor]:
    """The whole trained weights on the CPU under their one-process names (on rank 0 for FSDP, where every
    worker must call it; the others get an empty dict)."""
    if team.parallel == "ddp":
        return {k: v.detach().to("cpu", copy=True) for k, v in inner_model(run).named_parameters() if v.requires_grad}
    return checkpoint.full_trainable_weights(run.model)
