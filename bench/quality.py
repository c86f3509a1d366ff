"""Does the search pay in GSM8K accuracy? Four models, one GSM8K test slice, the same data and run length.

    .venv/bin/python bench/quality.py                      # the CPU sizes (--preset cpu): <= 60 min on 2 cores
    python bench/quality.py --preset gpu                   # all of GSM8K train and test, 4 trials per GPU
    .venv/bin/python bench/quality.py --smoke-test         # random:tiny, a few problems: about two minutes

(a) base: the model as loaded, untrained.
(b) class project: search_spaces/sgd.yaml's training section (SGD, momentum 0.9, Nesterov, lr 1e-4, cosine,
    3% warmup, clip 1.0), full fine-tune (``--sgd-lora``: LoRA r=8 instead, when a full fine-tune does not fit).
(c) default recipe: search_spaces/adamw_lora.yaml as written (AdamW lr 2e-4, LoRA r=16 alpha=32 on every
    projection, cosine, 3% warmup, clip 1.0).
(d) the search: adamw_lora.yaml's own space (lr, accumulation, LoRA rank) searched with Optuna TPE and the
    halving scheduler by ``python -m tune_llama.search``, its top ``--top-k`` trials re-ranked on the validation
    problems by GSM8K accuracy (``search.finalists``), the winner exported with ``tune_llama.export``. The
    search's cost is printed beside it: trials, trial-steps (the sum over trials of the last optimizer step each
    reported) and wall time.

Whether the search beats the recipe given the search's whole compute (the recipe trained that much longer, or
the best of that many seeds) is ``bench/equal_compute.py``'s question, paired over seeds.

Every trained run, each search trial included, sees the same train and validation problems, epochs, batch size,
report points and seed, and keeps its best report by validation loss (``tune_llama.train`` / the search's
checkpoint). The recipes' model, data and size fields are replaced by the bench's (model, sizes, fp32 weights,
bf16 autocast on CUDA, fp32 on CPU; no early stopping, so no run trains less than the others). All four are
loaded with ``tune_llama.evaluate.load`` and scored on the first ``--test`` problems of the test split:
teacher-forced mean loss per gold answer token (``tune_llama.loop.validation_loss``; the sharper signal for a
small model), then greedy generation (``tune_llama.evaluate.score``) without and with calculator-assisted
decoding: strict and flexible accuracy with 95% Wilson intervals. (d) minus each other row, per problem:
the paired difference in strict accuracy with its 95% interval (``tune_llama.paired``, exact McNemar), and
whether (d) is better or not distinguishable at this size. Per-problem outputs go to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path, sets OMP_WAIT_POLICY before torch loads)

import yaml  # noqa: E402

SPACES = common.REPO / "search_spaces"
DATA_DEFAULT = str(common.GSM8K) if (common.GSM8K / "train.jsonl").is_file() else "embedded:gsm8k-mini"
PRESETS = {
    # 2 CPU cores: sized so the whole bench fits in an hour (see bench/README.md).
    "cpu": dict(train=32, val=8, test=32, epochs=1, eval_every=0.5, max_length=320, max_new_tokens=192,
                batch_size=8, gen_batch=16, samples=4, concurrent=1, cpus=2, gpu_share=0.0, top_k=2),
    # One GPU: the whole train and test split, four trials at a time, each on a quarter of the card.
    "gpu": dict(train=0, val=200, test=0, epochs=2, eval_every=0.25, max_length=512, max_new_tokens=256,
                batch_size=8, gen_batch=64, samples=16, concurrent=4, cpus=4, gpu_share=0.25, top_k=3),
}
METHODS = {"a": "base model", "b": "class project", "c": "default recipe", "d": "search winner"}
ORDER = ("a", "b", "c", "d")
SMOKE = ["--set", "model.name=random:tiny", "--train", "8", "--val", "4", "--test", "4", "--max-length", "1024",
         "--max-new-tokens", "16", "--samples", "2"]


# ---------------------------------------------------------------- specs

def recipe(args, file: str, *, search: bool):
    """``file``'s spec with the bench's model, data, sizes and precision, ``--set`` last."""
    from tune_llama.spec import spec_from_dict
    raw = yaml.safe_load((SPACES / file).read_text())
    on_gpu = common.cuda()
    raw["model"].update(name=args.model, dtype="float32", gradient_checkpointing=False)
    raw["data"] = {"source": args.data, "train_size": args.train or None, "val_size": args.val,
                   "max_length": args.max_length, "overlong": "drop", "batch_size": args.batch_size,
                   "eval_batch_size": args.gen_batch}
    raw["training"].update(epochs=args.epochs, eval_every=args.eval_every, precision="bf16" if on_gpu else "fp32",
                           early_stopping_patience=None, seed=0, device="auto", log_every=10**9)
    raw["wandb"] = {"mode": "disabled"}
    if search:
        raw["search"].update(
            num_samples=args.samples, max_concurrent=args.concurrent, seed=0, keep_checkpoints=2,
            resources={"cpu": args.cpus, "gpu": args.gpu_share if on_gpu else 0},
            finalists={"top_k": args.top_k, "limit": args.val, "batch_size": args.gen_batch,
                       "max_new_tokens": args.max_new_tokens})
        raw["search"]["asha"]["grace_period"] = None  # the first report: the recipe's 1 epoch can be all there is
    else:
        raw.pop("search", None)
    return spec_from_dict(raw, args.overrides)


def class_project(args):
    spec = recipe(args, "sgd.yaml", search=False)
    if args.sgd_lora:
        spec.model.lora = dataclasses.replace(spec.model.lora, enabled=True)
    return spec


def describe(spec) -> str:
    t, lora = spec.training, spec.model.lora
    mantissa, exponent = f"{t.lr:.1e}".split("e")
    name = "AdamW" if t.optimizer == "adamw" else t.optimizer.upper()
    parts = [f"{name} lr {mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"]
    if t.optimizer == "sgd":
        parts[0] += f" m {t.momentum:g}{' nesterov' if t.nesterov else ''}"
    if t.gradient_accumulation_steps > 1:
        parts.append(f"accum {t.gradient_accumulation_steps}")
    parts.append(f"LoRA r{lora.r} a{lora.alpha}" if lora.enabled else "full FT")
    return ", ".join(parts)


def same_budget(a, b) -> bool:
    keys = ("epochs", "eval_every", "seed")
    data = ("source", "train_size", "val_size", "split_seed", "max_length", "overlong", "batch_size")
    return a.model.name == b.model.name and all(getattr(a.training, k) == getattr(b.training, k) for k in keys) \
        and all(getattr(a.data, k) == getattr(b.data, k) for k in data)


# ---------------------------------------------------------------- training

def train_run(spec, folder: Path) -> dict:
    """``tune_llama.train``: its best report's model in ``folder/best``."""
    from tune_llama.train import train
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its report lines are progress, not the result
        summary = train(spec, folder)
    if "best_model" not in summary:
        sys.exit(f"{folder}: the run ended {summary['status']} with no finite validation loss")
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"model": summary["best_model"], "config": describe(spec), "wall_s": time.perf_counter() - start,
            "steps": history[-1]["step"], "epochs": history[-1]["epoch"], "best_eval_loss": summary["best_eval_loss"],
            "best_step": summary["best_step"], "params": None}


def run_search(args, spec, folder: Path) -> dict:
    """A real search in a subprocess (as a user runs it), then the export of its winner."""
    from tune_llama.errors import UserError
    from tune_llama.export import EXPORT_FILE, export
    from tune_llama.results import load_search, load_search_spec
    if args.search:
        experiment = Path(args.search).resolve()
        if not same_budget(load_search_spec(experiment), spec):
            raise UserError(f"--search {experiment}: its model, data, epochs or report points differ from this "
                            "bench's, so the budget would not be equal")
        search_s = None
    else:
        folder.mkdir(parents=True, exist_ok=True)
        spec_file = folder / "search_adamw_lora.yaml"
        spec_file.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        command = [sys.executable, "-m", "tune_llama.search", str(spec_file), "--storage", str(folder),
                   "--name", "search"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO),
                                                                          os.environ.get("PYTHONPATH")]))}
        common.say("search: " + shlex.join(command))
        start = time.perf_counter()
        code = subprocess.run(command, cwd=common.REPO, env=env, stdout=sys.stderr).returncode
        search_s = time.perf_counter() - start
        if code:
            sys.exit(f"the search exited {code}; see {folder / 'search'}")
        experiment = folder / "search"
    start = time.perf_counter()
    out = export(experiment, folder / "export")
    export_s = time.perf_counter() - start
    info = json.loads((out / EXPORT_FILE).read_text())
    found = load_search(experiment)
    trials = [t for t in found.trials if t.rows]
    finalists = found.finalists() or {}
    from tune_llama.spec import spec_from_dict
    return {"model": str(out), "config": describe(spec_from_dict(info["spec"])),
            "wall_s": (search_s or 0.0) + export_s, "search_s": search_s, "export_s": export_s,
            "steps": sum(max(r["step"] for r in t.rows) for t in trials),
            "epochs": sum(max(r["epoch"] for r in t.rows) for t in trials), "trials": len(trials),
            "statuses": {s: sum(found.status(t) == s for t in trials) for s in {found.status(t) for t in trials}},
            "trial_time_s": sum(t.time_s for t in trials),
            "finalists_s": sum(s["seconds"] for e in finalists.get("finalists", []) for s in e["scores"]),
            "winner": info["trial_id"], "reason": info["reason"], "params": info["params"],
            "best_eval_loss": info["metrics"].get("eval_loss"), "best_step": info["step"],
            "folder": str(experiment), "finalists_comparison": finalists.get("comparison")}


# ---------------------------------------------------------------- scoring

def answer_loss(measure_spec, model, tokenizer, problems) -> tuple[float, int]:
    """Teacher-forced mean loss per gold answer token (EOS included), as validation measures it."""
    from tune_llama.data import encode
    from tune_llama.loop import setup, validation_loss
    encoded = encode(problems, tokenizer, measure_spec.data)
    run = setup(measure_spec, model=model, tokenizer=tokenizer, data=(encoded, encoded))
    tokens = sum(int((labels[1:] != -100).sum()) for labels in encoded.labels)
    return validation_loss(run, encoded), tokens


def evaluate(args, name: str, measure_spec, problems, folder: Path, key: str) -> dict:
    """Gold-answer loss, then accuracy without and with the calculator; every model with the training template."""
    import torch
    from tune_llama.evaluate import load, score
    from tune_llama.loop import pick_device
    loaded = load(name, pick_device("auto"))
    result = {}
    start = time.perf_counter()
    result["answer_loss"], result["answer_tokens"] = answer_loss(measure_spec, loaded.model, loaded.tokenizer,
                                                                 problems)
    result["answer_loss_s"] = time.perf_counter() - start
    for calculator in (False, True):
        with torch.no_grad():
            s = score(loaded.model, loaded.tokenizer, problems, measure_spec.data.prompt_template,
                      batch_size=args.gen_batch, max_new_tokens=args.max_new_tokens, calculator=calculator,
                      out=folder / f"{key}{'-calculator' if calculator else ''}.jsonl")
        suffix = "_calc" if calculator else ""
        result.update({f"strict{suffix}": s["strict"], f"flexible{suffix}": s["flexible"],
                       f"generate{suffix}_s": s["seconds"]})
    del loaded
    common.free_memory()
    return result


def paired_to_search(rows: dict) -> None:
    """Each row's ``d_minus``: (d) minus it, strict accuracy, problem by problem."""
    from tune_llama.paired import paired_difference
    if "d" not in rows:
        return
    for key, row in rows.items():
        if key != "d":
            row["d_minus"] = paired_difference(rows["d"]["strict"]["per_problem"], row["strict"]["per_problem"])


# ---------------------------------------------------------------- output

def signed(c: dict) -> str:
    return f"{c['difference']:+.1%} [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}]"


def acc(m: dict, ci: bool = True) -> str:
    text = f"{m['accuracy']:.1%}"
    return text + f" [{m['ci95'][0]:.1%}, {m['ci95'][1]:.1%}]" if ci else text


def table(rows: dict) -> tuple[list[dict], list[tuple[str, str]]]:
    lines = [{"row": f"({k}) {METHODS[k]}", "config": r.get("config", "untrained"),
              "steps": r.get("steps", 0), "epochs": f"{r.get('epochs', 0):.3g}", "train": f"{r.get('wall_s', 0):.0f}",
              "loss": f"{r['answer_loss']:.4f}", "strict": acc(r["strict"]), "flexible": acc(r["flexible"], False),
              "strict_calc": acc(r["strict_calc"]), "d_minus": signed(r["d_minus"]) if "d_minus" in r else "-"}
             for k, r in rows.items()]
    return lines, [("row", "method"), ("config", "config"), ("epochs", "epochs trained"), ("steps", "opt. steps"),
                   ("train", "train/search s"),
                   ("loss", "test answer loss"), ("strict", "strict [95% CI]"), ("flexible", "flexible"),
                   ("strict_calc", "strict, calculator [95% CI]"), ("d_minus", "(d) − row, strict [95% CI]")]


def machine() -> str:
    import torch
    if common.cuda():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}), load average " \
           f"{os.getloadavg()[0]:.1f}, no GPU"


# ---------------------------------------------------------------- main

def arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="the sizes below (default: gpu when CUDA is there, else cpu)")
    p.add_argument("--model", default="embedded:smollm2", help="model.name of every contender (default %(default)s)")
    p.add_argument("--data", default=DATA_DEFAULT, help="GSM8K folder or data source (default %(default)s)")
    sizes = {"train": "training problems, 0 = all (data.train_size)", "val": "validation problems (data.val_size), "
             "also the finalists' accuracy set", "test": "first N test problems scored, 0 = all",
             "epochs": "training.epochs of every run and trial", "eval_every": "training.eval_every",
             "max_length": "data.max_length (longer examples dropped)", "max_new_tokens": "generation budget",
             "batch_size": "data.batch_size", "gen_batch": "problems generated at once",
             "samples": "search.num_samples", "concurrent": "search.max_concurrent", "cpus": "CPUs per trial",
             "gpu_share": "GPUs per trial on CUDA (search.resources.gpu)", "top_k": "search.finalists.top_k"}
    for name, text in sizes.items():
        kind = float if name in ("eval_every", "gpu_share") else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{text} (preset)")
    p.add_argument("--sgd-lora", action="store_true", help="(b) with LoRA r=8 instead of a full fine-tune")
    p.add_argument("--search", metavar="DIR", help="(d) from this finished search (same data and epochs) "
                                                   "instead of running one")
    p.add_argument("--methods", default="abcd", help="which rows to run (default %(default)s)")
    p.add_argument("--out", type=Path, help="run folders and per-problem outputs (default results/quality-TIME)")
    p.add_argument("--threads", type=int, help="torch CPU threads in this process (default: torch's choice)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any spec field of (b), (c) and (d), e.g. model.name=random:tiny (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--smoke-test", action="store_true", help="random:tiny on a few problems: " + " ".join(SMOKE))
    args = p.parse_args(argv)
    if args.smoke_test:
        args = p.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])
    preset = args.preset or ("gpu" if common.cuda() else "cpu")
    for name, value in PRESETS[preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.preset = preset
    unknown = set(args.methods) - set("abcd")
    if unknown:
        p.error(f"--methods: unknown {''.join(sorted(unknown))}; choose from abcd")
    return args


def main(argv=None) -> int:
    args = arguments(argv)
    from tune_llama.data import load_test
    from tune_llama.spec import DataSpec
    specs = {"b": class_project(args), "c": recipe(args, "adamw_lora.yaml", search=False),
             "d": recipe(args, "adamw_lora.yaml", search=True)}  # a bad --set fails here, before any work
    common.start(args)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    out = (args.out or common.REPO / "results" / f"quality-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    test = load_test(DataSpec(source=args.data))
    test = test[:args.test] if args.test else test
    # The gold answers are measured whole: no test problem is dropped or cut for the loss.
    measure = dataclasses.replace(specs["c"], data=dataclasses.replace(
        specs["c"].data, max_length=1 << 16, overlong="truncate", batching="length_grouped", train_size=None))
    common.say(f"out: {out}; {len(test)} test problems; preset {args.preset}")

    rows, scored = {}, {}
    for key in ORDER:
        if key[0] not in args.methods:
            continue
        common.say(f"--- ({key}) {METHODS[key]}")
        if key == "a":
            rows[key] = {"model": specs["c"].model.name, "config": "untrained", "steps": 0, "epochs": 0, "wall_s": 0.0}
        elif key == "d":
            rows[key] = run_search(args, specs["d"], out / "d")
        else:
            rows[key] = train_run(specs[key], out / key)
        model = rows[key]["model"]
        if model not in scored:
            scored[model] = evaluate(args, model, measure, test, out, key)
        rows[key].update(scored[model])
        (out / "quality.json").write_text(json.dumps({"rows": rows}, indent=1, default=str))
    paired_to_search(rows)

    d = specs["d"]
    notes = [f"machine: {machine()}", f"command: {command}",
             f"data: {args.data}; {len(test)} test problems (the first of the test split); every trained run: "
             f"{d.data.train_size or 'all'} train / {d.data.val_size} validation problems, {d.training.epochs} "
             f"epoch(s), batch {d.data.batch_size}, max_length {d.data.max_length}, report every "
             f"{d.training.eval_every:g}, best report by validation loss kept"]
    if "d" in rows:
        r = rows["d"]
        wall = f"{r['search_s']:.0f} s search (incl. {r['finalists_s']:.0f} s finalists) + " \
            if r["search_s"] is not None else f"(reused {r['folder']}) "
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(r["statuses"].items()))
        notes.append(f"(d) search cost: {r['trials']} trials ({statuses}), {r['steps']} trial-steps, "
                     f"{r['epochs']:.3g} trial-epochs = {r['epochs'] / d.training.epochs:.2g}x the training of one "
                     f"run; {wall}{r['export_s']:.0f} s export; winner {r['winner']} "
                     f"{json.dumps(r['params'])}, {r['reason']}")
    if rows.get("d", {}).get("finalists_comparison"):
        from tune_llama.finalists import comparison_text
        notes.append(f"(d) finalists, on {args.val} validation problems: "
                     + comparison_text(rows["d"]["finalists_comparison"]))
    from tune_llama.paired import sentence
    notes += [sentence(r["d_minus"], "(d)", f"({k})") for k, r in rows.items() if "d_minus" in r]
    notes.append(f"generation: greedy, {args.max_new_tokens} new tokens at most; per-problem outputs in {out}")
    payload = {"machine": machine(), "command": command, "preset": args.preset, "data": args.data,
               "test_problems": len(test), "sizes": {k: getattr(args, k) for k in PRESETS["cpu"]}, "out": str(out),
               "rows": rows}
    (out / "quality.json").write_text(json.dumps(payload, indent=1, default=str))
    lines, columns = table(rows)
    common.output(args, lines, columns, payload, "\n".join(notes))
    return 0


if __name__ == "__main__":
    from tune_llama.cli import run_cli
    run_cli(main)  # a bad --set or --search: one line naming it, exit 2
