"""Training throughput of our loop against the loops a user would pick instead, in one invocation.

    .venv/bin/python bench/throughput.py                          # CPU: SmolLM2-135M + LoRA, GSM8K, 60 s each
    .venv/bin/python bench/throughput.py --seconds 10 --rounds 1   # smoke run
    python3 bench/throughput.py --model random:llama-2-7b --data synthetic    # GPU (bf16 there)

Contenders (same model and seed, examples, batch size, lr, precision): ours, ours-budget (``--max-tokens``),
hf-trainer, hf-grouped, hf-flat (``DataCollatorWithFlattening``, only where flattened and padded logits
agree), recipes. Warmup steps untimed, then >= ``--seconds`` each, in interleaved rotated rounds; real
tokens/s min/median/max, and ours / the strongest other. bench/README.md says what each one is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import torch  # noqa: E402

from tune_llama.loop import encode_splits, epoch_windows, setup, train_step  # noqa: E402
from tune_llama.model import load_model, load_tokenizer  # noqa: E402
from tune_llama.spec import spec_from_dict  # noqa: E402

CONTENDERS = ("ours", "ours-budget", "hf-trainer", "hf-grouped", "hf-flat", "recipes")
H100_BF16_PEAK_FLOPS = 989e12
"""Dense bf16 peak of an H100/H200 SXM, the MFU denominator."""


class Clock:
    """After ``warmup`` untimed steps, records (seconds, real, computed tokens) per step; ``tick`` says stop
    once ``seconds`` have passed. The device is synchronised where the timing starts and where it ends.
    ``cpu_s``: the process's CPU time (all threads) over the timed steps, which other jobs on a shared
    host disturb far less than wall time."""

    def __init__(self, device, warmup: int, seconds: float):
        self.device, self.warmup, self.seconds, self.seen, self.steps = device, warmup, seconds, 0, []

    def tick(self, real: int, computed: int) -> bool:
        self.seen += 1
        if self.seen < self.warmup:
            return False
        done = self.seen > self.warmup and time.perf_counter() - self.start >= self.seconds
        if done or self.seen == self.warmup:
            common.sync(self.device)
        now = time.perf_counter()
        if self.seen == self.warmup:
            self.start, self.cpu_s = now, -time.process_time()
        else:
            self.steps.append((now - self.last, real, computed))
        self.last = now
        if done:
            self.cpu_s += time.process_time()
        return done


@dataclasses.dataclass
class Bench:
    spec: object
    tokenizer: object
    train: object
    val: object
    device: torch.device
    n_params: int = 0
    """Base-model parameters (LoRA adapters left out): N in the MFU formula."""

    def model(self):
        torch.manual_seed(self.spec.training.seed)  # the LoRA init draws from the global generator
        model = load_model(self.spec.model, self.tokenizer, self.device, seed=self.spec.training.seed)
        self.n_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
        return model

    def rows(self) -> list[dict]:
        return [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()}
                for ids, labels in zip(self.train.input_ids, self.train.labels)]

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.spec.training.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def counts(batch) -> tuple[int, int]:
    """(real, computed) tokens of a batch; a flattened batch has no padding and no attention mask."""
    mask = batch.get("attention_mask")
    return (int(mask.sum()) if mask is not None else batch["input_ids"].numel()), batch["input_ids"].numel()


# ---------------------------------------------------------------- the contenders

def ours(b: Bench, clock: Clock, budget=None) -> None:
    spec = b.spec if budget is None else spec_from_dict(b.spec.to_dict(), [f"data.max_tokens_per_batch={budget}"])
    run = setup(spec, model=b.model(), tokenizer=b.tokenizer, data=(b.train, b.val))
    for epoch in itertools.count():
        for window in epoch_windows(run, epoch):
            real = train_step(run, window).real_tokens
            if clock.tick(real, sum(batch["input_ids"].numel() for batch in window)):
                return


def hf(b: Bench, clock: Clock, grouped=False, flat=False) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    collate, built = collator(b, flat), []

    def counting(features):
        batch = collate(features)
        built.append(counts(batch))  # in step order; the data loader may build one batch ahead
        return batch

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = clock.tick(*built[state.global_step - 1])

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    group = {"group_by_length": True} if "group_by_length" in fields else {"train_sampling_strategy": "group_by_length"}
    t = b.spec.training
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"), per_device_train_batch_size=b.spec.data.batch_size,
        num_train_epochs=100, learning_rate=t.lr, seed=t.seed, report_to="none", save_strategy="no",
        disable_tqdm=True, bf16=t.precision == "bf16", use_cpu=b.device.type == "cpu", **(group if grouped else {}))
    Trainer(model=b.model(), args=args, train_dataset=b.rows(), data_collator=counting, callbacks=[Stop()]).train()


def collator(b: Bench, flat: bool):
    if flat:
        from transformers import DataCollatorWithFlattening  # transformers >= 4.44
        return DataCollatorWithFlattening()
    from transformers import DataCollatorForSeq2Seq
    return DataCollatorForSeq2Seq(b.tokenizer, padding=True, label_pad_token_id=-100)


def recipes(b: Bench, clock: Clock) -> None:
    model, rows, collate = b.model(), b.rows(), collator(b, flat=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=b.spec.training.lr)
    model.train()
    for epoch in itertools.count():
        loader = torch.utils.data.DataLoader(rows, batch_size=b.spec.data.batch_size, shuffle=True,
                                             collate_fn=collate, generator=torch.Generator().manual_seed(epoch))
        for step, batch in enumerate(loader):
            real, computed = counts(batch)
            with b.autocast():
                loss = model(**{k: v.to(b.device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            status = f"epoch {epoch} step {step} loss {loss.detach().float()}"  # noqa: F841  a sync per step
            if clock.tick(real, computed):
                return


def flattening_gap(b: Bench) -> float:
    """Mean |logits difference| between a flattened and a padded batch of the same 3 examples, relative to
    the mean |logit|: ~0 where the attention keeps flattened examples apart, large where they see each other."""
    model, rows = b.model().eval(), b.rows()[:3]
    with torch.no_grad(), b.autocast():
        padded = model(**{k: v.to(b.device) for k, v in collator(b, False)(rows).items() if k != "labels"}).logits
        flat = model(**{k: v.to(b.device) for k, v in collator(b, True)(rows).items() if k != "labels"}).logits[0]
    padded = torch.cat([padded[i, :len(r["input_ids"])] for i, r in enumerate(rows)]).float()
    return float((padded - flat.float()).abs().mean() / padded.abs().mean())


# ---------------------------------------------------------------- rounds and figures

def summarise(name: str, rounds: list[dict], lora: bool, n_params: int, device) -> dict:
    real = [r["real"] / r["seconds"] for r in rounds]
    row = dict(name=name, min=min(real), median=statistics.median(real), max=max(real),
               computed=statistics.median(r["computed"] / r["seconds"] for r in rounds),
               share=sum(r["real"] for r in rounds) / sum(r["computed"] for r in rounds),
               tokens_per_step=sum(r["computed"] for r in rounds) / sum(r["steps"] for r in rounds),
               peak_gb=statistics.median(r["peak_gb"] for r in rounds))
    if device.type == "cpu":
        row["per_cpu_s"] = statistics.median(r["real"] / r["cpu_s"] for r in rounds)
    else:
        row["mfu"] = row["median"] * (4 if lora else 6) * n_params / H100_BF16_PEAK_FLOPS
    return row


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--seconds", type=float, help="timed seconds per contender and round (CPU 60, CUDA 20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--max-tokens", type=int, help="adds ours-budget: ours with data.max_tokens_per_batch=N")
    p.add_argument("--only", nargs="+", choices=CONTENDERS, help="these contenders only")
    args = p.parse_args(argv)
    common.start(args)
    device = torch.device("cuda" if common.cuda() else "cpu")
    seconds = args.seconds or (20.0 if device.type == "cuda" else 60.0)
    spec = common.make_spec(args)
    tokenizer = load_tokenizer(spec.model)
    bench = Bench(spec, tokenizer, *encode_splits(spec, tokenizer), device)
    contenders = {"ours": ours, "ours-budget": lambda b, c: ours(b, c, args.max_tokens), "hf-trainer": hf,
                  "hf-grouped": lambda b, c: hf(b, c, grouped=True), "hf-flat": lambda b, c: hf(b, c, flat=True),
                  "recipes": recipes}
    names = args.only or [n for n in CONTENDERS if n != "ours-budget" or args.max_tokens]
    skipped, notes = {}, ""
    if "hf-flat" in names:
        try:
            gap = flattening_gap(bench)
            notes = f"hf-flat: flattened vs padded logits differ by {gap:.2g} (relative mean) with " \
                    f"attn_implementation={spec.model.attn_implementation}\n"
            if gap > (1e-3 if spec.training.precision == "fp32" else 0.02):
                skipped["hf-flat"] = "the attention in use lets flattened examples see each other"
        except ImportError as err:
            skipped["hf-flat"] = str(err)
    common.say(f"{spec.model.name} ({'full fine-tune' if args.full else 'LoRA r=8'}), {spec.training.precision}, "
               f"{len(bench.train)} examples, batch {args.batch_size}, {args.warmup_steps} warmup steps, "
               f"then >= {seconds:g} s per contender, {args.rounds} round(s)")
    results: dict[str, list[dict]] = {n: [] for n in names if n not in skipped}
    for r in range(args.rounds):
        for name in list(results)[r % len(results):] + list(results)[:r % len(results)]:  # rotated
            clock = Clock(device, max(1, args.warmup_steps), seconds)
            common.free_memory(device)
            try:
                with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its own summary; stdout is ours
                    contenders[name](bench, clock)
            except ImportError as err:
                skipped[name] = str(err)
                continue
            seconds_, real, computed = (sum(column) for column in zip(*clock.steps))
            results[name].append(dict(seconds=seconds_, real=real, computed=computed, steps=len(clock.steps),
                                      cpu_s=clock.cpu_s, peak_gb=common.peak_gb(device)))
            common.say(f"  round {r + 1} {name}: {real / seconds_:.1f} real tok/s ({len(clock.steps)} steps, "
                       f"{seconds_:.0f} s, real share {real / computed:.3f})")
    rows = [summarise(n, rs, not args.full, bench.n_params, device) for n, rs in results.items() if rs]
    medians = {row["name"]: row["median"] for row in rows}
    others = {n: v for n, v in medians.items() if not n.startswith("ours")}
    strongest = max(others, key=others.get) if others and "ours" in medians else None
    for row in rows:
        row["ours_x"] = medians.get("ours", float("nan")) / row["median"]
    payload = {**medians, **({"ratio_vs_strongest": medians["ours"] / others[strongest]} if strongest else {})}
    notes += "".join(f"{n}: skipped: {why}\n" for n, why in skipped.items())
    if strongest:
        notes += f"ours / strongest ({strongest}): {payload['ratio_vs_strongest']:.2f}x (medians of real tok/s)"
        cpu = {row["name"]: row["per_cpu_s"] for row in rows if device.type == "cpu"}
        if cpu:  # CPU time: what a shared host's other jobs disturb least
            best = max((n for n in cpu if not n.startswith("ours")), key=cpu.get)
            notes += f"; by real tok/CPU-s: ours / strongest ({best}): {cpu['ours'] / cpu[best]:.2f}x"
    common.output(args, rows, [
        ("name", "loop"), ("min", "real tok/s min"), ("median", "median"), ("max", "max"),
        ("computed", "computed tok/s"), ("share", "real share"), ("tokens_per_step", "tokens/step"),
        ("per_cpu_s", "real tok/CPU-s"), ("peak_gb", "peak GiB"),
        ("ours_x", "ours / it")] + ([("mfu", "MFU")] if device.type == "cuda" else []), payload, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
