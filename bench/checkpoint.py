"""Checkpoint cost as a share of epoch time, full fine-tune and LoRA.

    .venv/bin/python bench/checkpoint.py            # CPU: embedded SmolLM2 (135M), real 1-trial Ray Tune runs
    python3 bench/checkpoint.py --no-ray            # GPU image (no ray): save_state alone, 7B shape

With Ray (the default where it is installed) each mode runs a real trial: a
1-sample ``tune.Tuner`` over the real trainable ``tune_llama.trainable.train_trial``.
Per epoch it reads the loop's own metrics, ``epoch_time_s`` (train + eval) and
``checkpoint_time_s`` (``save_state`` into a temporary folder: trainable weights
as safetensors, optimizer, schedule, RNG), and adds ``report_s``: the time of the
trainable's report hook, i.e. ``tune.report`` with the checkpoint (Ray copies the
folder into its storage and hands the result to the driver) plus removing the
temporary folder. ``report_s`` is measured by wrapping ``report_to_tune`` inside
the trial's worker process. Share = (checkpoint_time_s + report_s) / epoch_time_s.

Without Ray (``--no-ray``; automatic when ray is missing) it builds the run with
``tune_llama.loop.setup``, trains a few fixed-shape steps (so the optimizer state
exists), times ``save_state`` alone, and sets it against the measured epoch and
against an epoch projected from the measured tokens/s: a full GSM8K train epoch
(about 1.39M real tokens) and the class project's 65 s epoch. Ray's persist is
not included there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)
from common import PeakMemory, Timer, free_memory  # noqa: E402

import torch  # noqa: E402


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path else 0


# ---------------------------------------------------------------- with Ray: a real trial

def timed_trial(config: dict, spec: dict, log_path: str) -> None:
    """The real trainable, with its report hook timed. Runs in the Ray worker (pickled by value)."""
    import tune_llama.trainable as trainable

    original = trainable.report_to_tune

    def report(metrics: dict, checkpoint_dir) -> None:
        size = folder_bytes(checkpoint_dir)
        tick = time.perf_counter()
        original(metrics, checkpoint_dir)
        line = {"epoch": metrics["epoch"], "report_s": time.perf_counter() - tick, "bytes": size}
        with open(log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    trainable.report_to_tune = report  # train_trial looks the hook up by name at call time
    try:
        trainable.train_trial(config, spec)
    finally:
        trainable.report_to_tune = original


def ray_trial(spec, name: str, storage: Path, cpus: int) -> list[dict]:
    from ray import tune

    log = storage / f"{name}-report.jsonl"
    trainable = tune.with_resources(
        tune.with_parameters(timed_trial, spec=spec.to_dict(), log_path=str(log)), {"cpu": cpus, "gpu": 0})
    tuner = tune.Tuner(trainable, param_space={}, tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    started = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - started
    if results.errors:
        raise RuntimeError(f"the {name} trial failed: {results.errors[0]}")
    frame = results[0].metrics_dataframe
    reports = {r["epoch"]: r for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    rows = []
    for _, m in frame.iterrows():
        epoch = int(m["epoch"])
        rep = reports.get(epoch, {})
        row = dict(mode=name, epoch=epoch, epoch_time_s=float(m["epoch_time_s"]),
                   checkpoint_time_s=float(m["checkpoint_time_s"]), report_s=rep.get("report_s"),
                   mb=rep.get("bytes", 0) / 2**20, tokens_per_s=float(m["tokens_per_s"]),
                   peak_memory_gb=float(m["peak_memory_gb"]), trial_wall_s=wall)
        row["save_share"] = row["checkpoint_time_s"] / row["epoch_time_s"]
        if row["report_s"] is not None:
            row["share"] = (row["checkpoint_time_s"] + row["report_s"]) / row["epoch_time_s"]
        rows.append(row)
    return rows


def with_ray(args) -> dict:
    import ray

    storage = Path(tempfile.mkdtemp(prefix="bench-ckpt-")).resolve()
    ray.init(num_cpus=max(1, args.ray_cpus), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=True)
    rows = []
    try:
        for mode in args.modes:
            spec = common.make_spec(model=args.model, source=args.source, examples=args.examples,
                                    batch_size=args.batch_size, max_length=args.max_length, lora=mode == "lora",
                                    dtype=args.dtype, precision=args.precision, epochs=args.epochs,
                                    val_size=args.val_size, device="cpu" if not torch.cuda.is_available() else "auto")
            print(f"{mode}: 1-trial tune.Tuner over tune_llama.trainable.train_trial, {args.epochs} epoch(s) ...",
                  flush=True)
            rows += ray_trial(spec, mode, storage, max(1, args.ray_cpus))
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    common.print_table(rows, [
        ("mode", "mode"), ("epoch", "epoch"), ("epoch_time_s", "epoch s"), ("checkpoint_time_s", "save_state s"),
        ("report_s", "tune.report s"), ("mb", "ckpt MiB"), ("save_share", "save share"), ("share", "share"),
        ("tokens_per_s", "tok/s"), ("trial_wall_s", "trial wall s")],
        title=f"checkpoint cost inside a real Ray Tune trial ({common.device_name()})")
    print("epoch s = loop epoch_time_s (train + eval); save_state s = loop checkpoint_time_s; tune.report s = the "
          "trainable's report hook (Ray persist copy + driver hand-off + temp cleanup);\n"
          "share = (save_state + tune.report) / epoch. Goal: <= 2% for LoRA; the class project's: "
          f"{common.CLASS_PROJECT['checkpoint_s']:.0f} s / {common.CLASS_PROJECT['epoch_s']:.0f} s = "
          f"{common.CLASS_PROJECT['checkpoint_s'] / common.CLASS_PROJECT['epoch_s']:.0%}")
    return {"ray": rows}


# ---------------------------------------------------------------- without Ray: save_state alone

def without_ray(args, device: torch.device) -> dict:
    from tune_llama.data import encode, load_splits
    from tune_llama.loop import save_state, seed_everything, setup, train_epoch
    from tune_llama.model import load_model, load_tokenizer, prepare_for_training

    base = common.make_spec(model=args.model, source=args.source, examples=args.examples, batch_size=args.batch_size,
                            max_length=args.max_length, lora=False, dtype=args.dtype, precision=args.precision,
                            optimizer=args.full_optimizer, device=device.type, val_size=args.val_size)
    tokenizer = load_tokenizer(base.model)
    examples = encode(load_splits(base.data).train, tokenizer, base.data)
    seed_everything(0)
    with Timer(device) as build:
        model = load_model(base.model, tokenizer, device)
    print(f"{args.model} built in {build.s:.1f} s; {args.warmup_steps} warmup + {args.steps} timed steps of "
          f"{args.batch_size} x {args.max_length} tokens per mode, then save_state", flush=True)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-ckpt-")).resolve()
    rows = []
    for mode in args.modes:  # LoRA first (the goal's figure), then the adapter is removed for the full fine-tune
        spec = base
        if mode == "lora":
            spec = dataclasses.replace(base, model=dataclasses.replace(
                base.model, lora=dataclasses.replace(base.model.lora, enabled=True)),
                training=dataclasses.replace(base.training, optimizer="adamw"))
            model = prepare_for_training(model, spec.model)
        elif hasattr(model, "unload"):
            model = model.unload()  # peft: the base model without the adapter layers
            model.requires_grad_(True)
        row = dict(mode=mode, optimizer=spec.training.optimizer)
        try:
            row.update(time_save(spec, model, tokenizer, examples, scratch / mode, args, device, save_state, setup,
                                 train_epoch))
        except Exception as err:
            if not common.is_oom(err) and not isinstance(err, OSError):
                raise
            row["error"] = "OOM" if common.is_oom(err) else f"OSError: {err}"
        finally:
            model.zero_grad(set_to_none=True)
            shutil.rmtree(scratch / mode, ignore_errors=True)
            free_memory()
        rows.append(row)
        common.write_json(args.json, "checkpoint", {"save_state": rows})  # kept if the stage is cut off
        print("  " + " ".join(f"{k}={common.fmt(v)}" for k, v in row.items()), flush=True)
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    common.print_table(rows, [
        ("mode", "mode"), ("optimizer", "optimizer"), ("save_s", "save_state s"), ("mb", "ckpt MiB"),
        ("tokens_per_s", "tok/s"), ("share_gsm8k", "share GSM8K epoch"), ("share_class", "share of 65 s"),
        ("share_bench", "share bench epoch"), ("peak_gb", "peak GiB"), ("error", "note")],
        title=f"save_state alone, no Ray persist ({common.device_name()})")
    print(f"share GSM8K epoch = save_state / (GSM8K train epoch of {common.GSM8K_EPOCH_TOKENS:,} real tokens at the "
          "measured tok/s); share of 65 s = save_state / the class project's epoch; share bench epoch = save_state / "
          "the timed steps here. Goal: <= 2% for LoRA.")
    return {"save_state": rows}


def time_save(spec, model, tokenizer, examples, folder: Path, args, device, save_state, setup, train_epoch) -> dict:
    rows = common.fixed_rows(examples, args.max_length, (args.warmup_steps + args.steps) * args.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_bytes = sum(p.numel() * p.element_size() for p in trainable)
    states = {"adamw": 3, "sgd": 1 + (spec.training.momentum > 0)}.get(spec.training.optimizer, 3)
    need = n_bytes * states
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else tempfile.gettempdir()).free
    if need * 1.2 > free:
        raise OSError(f"needs ~{need / 2**30:.1f} GiB of disk, {free / 2**30:.1f} GiB free")
    run = setup(spec, model=model, tokenizer=tokenizer)
    try:
        run.train_set = common.subset(rows, args.warmup_steps * args.batch_size)
        train_epoch(run)  # creates the optimizer state the checkpoint carries
        run.train_set = common.subset(rows, args.steps * args.batch_size, start=args.warmup_steps * args.batch_size)
        with PeakMemory(device) as peak, Timer(device) as timer:
            train_epoch(run)
        tokens_per_s = args.steps * args.batch_size * args.max_length / timer.s
        folder.parent.mkdir(parents=True, exist_ok=True)
        with Timer(device) as save:
            save_state(run, folder)
        return dict(save_s=save.s, mb=folder_bytes(folder) / 2**20, tokens_per_s=tokens_per_s, peak_gb=peak.gb,
                    share_gsm8k=save.s / (common.GSM8K_EPOCH_TOKENS / tokens_per_s),
                    share_class=save.s / common.CLASS_PROJECT["epoch_s"], share_bench=save.s / timer.s)
    finally:
        run.optimizer.state.clear()
        del run


# ---------------------------------------------------------------- main

def have_ray() -> bool:
    try:
        import ray  # noqa: F401
        return True
    except ImportError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = common.parser(__doc__)
    p.add_argument("--model", default="random:llama-2-7b" if cuda else "embedded:smollm2")
    p.add_argument("--source", default=common.default_source())
    p.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    p.add_argument("--examples", type=int, default=16, help="training examples per epoch (Ray mode)")
    p.add_argument("--val-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1, help="epochs per trial (Ray mode)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16"])
    p.add_argument("--precision", default="bf16" if cuda else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-ray", action="store_true", help="time save_state alone (automatic without ray)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--full-optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="optimizer of the full fine-tune without Ray (sgd: weights only, for a small disk)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before timing (no-Ray mode)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (no-Ray mode)")
    p.add_argument("--dir", help="where save_state writes (no-Ray mode; default a temporary folder)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.modes = common.names(p, "--modes", args.modes, ("lora", "full"))
    if not args.no_ray and not have_ray():
        print("ray is not installed: timing save_state alone (no Ray persist)", flush=True)
        args.no_ray = True
    if args.no_ray:  # one base model: LoRA wraps it, then the adapter is removed for the full fine-tune
        args.modes = sorted(args.modes, key=lambda m: m != "lora")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(common.default_device())
    print(f"machine: {common.describe_machine()}", flush=True)
    results = without_ray(args, device) if args.no_ray else with_ray(args)
    common.write_json(args.json, "checkpoint", {**results, "setting": {k: v for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
