"""Does the search's model beat the recipe given the search's whole compute? Paired over seeds, at K runs.

    .venv/bin/python bench/equal_compute.py --setting tiny-off            # 8 seeds, K = 2 and 4: minutes
    .venv/bin/python bench/equal_compute.py --setting tiny
    .venv/bin/python bench/equal_compute.py --setting smollm2             # 3 seeds on real GSM8K: hours on 2 cores
    .venv/bin/python bench/equal_compute.py --smoke-test                  # one seed of tiny-off at K = 2

For each seed and each budget K, on the same problems:

- (s) ``tune-llama search`` with ``search.budget: K`` (``search.seed`` and ``training.seed`` = the seed), its
  winner as ``tune-llama export`` writes it;
- (e1) the recipe (the spec's own config) trained K times as long in one run (``tune-llama train``, its
  learning-rate schedule stretched to match), keeping its best validation report;
- (e2) the best of K runs of the recipe with seeds seed, seed+1000, ..., picked by validation loss.

Each is scored by its held-out loss: the teacher-forced mean loss per gold answer token on test problems
(GSM8K's test split; the synthetic source's own fixed test split), never seen in training or selection. The
difference (s) - min((e1), (e2)) is paired by seed: its mean with a 95% t interval over the seeds, relative to
the better baseline. The search's own reports give its compute (every trial's last epoch, summed), which must
stay within K runs. One PNG per setting draws the best validation loss so far against compute spent in runs,
for the search at the largest K and for (e1), seed by seed (``tune_llama.plots.best_so_far``).

Settings: ``tiny`` is ``search_spaces/tiny.yaml``'s own recipe (AdamW lr 3e-3, already near the best config,
under-trained at 4 epochs); ``tiny-off`` the same with the recipe's lr 10x too low (3e-4); ``smollm2`` the
embedded SmolLM2-135M with LoRA on real GSM8K, the recipe as ``search_spaces/adamw_lora.yaml`` writes it
(AdamW lr 2e-4, r 16), sized for 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path, sets OMP_WAIT_POLICY before torch loads)

import yaml  # noqa: E402

SPACES = common.REPO / "search_spaces"
TINY = ["training.eval_every=0.25", "search.max_concurrent=2", "search.resources.cpu=1"]
SETTINGS = {
    "tiny": {"file": "tiny.yaml", "overrides": TINY, "seeds": 8},
    "tiny-off": {"file": "tiny.yaml", "overrides": [*TINY, "training.lr=3e-4"], "seeds": 8},
    "smollm2": {"file": "adamw_lora.yaml", "overrides": [], "seeds": 3},
}
SMOLLM2 = dict(train=32, val=8, test=64, epochs=2, eval_every=0.25, max_length=320)
"""The smollm2 setting's size: two passes over 32 GSM8K problems make one run (~2 minutes on 2 cores), batch 4,
accumulation 1 or 2 (adamw_lora.yaml's 4 would leave one step an epoch here)."""
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086]
"""Student's t 97.5% quantiles for 1..20 degrees of freedom (a 95% two-sided interval)."""


# ---------------------------------------------------------------- specs

def setting_spec(name: str, args) -> dict:
    """The setting's spec as a dict, without ``num_samples`` (the budget sizes the search)."""
    raw = yaml.safe_load((SPACES / SETTINGS[name]["file"]).read_text())
    if name == "smollm2":
        size = SMOLLM2 if not args.smoke_test else {**SMOLLM2, "train": 8, "test": 8}
        raw["model"].update(name="embedded:smollm2", dtype="float32", gradient_checkpointing=False)
        raw["data"] = {"source": args.data, "train_size": size["train"], "val_size": size["val"],
                       "max_length": size["max_length"], "overlong": "drop", "batch_size": 4}
        # Every config reports every quarter epoch (8 micro-batches an epoch): accumulation of 4 would report
        # once an epoch at this size, so its rungs could not be judged where the plan puts them.
        raw["search"]["space"]["training.gradient_accumulation_steps"] = {"choice": [1, 2]}
        raw["training"].update(epochs=size["epochs"], eval_every=size["eval_every"], precision="fp32",
                               device="auto", log_every=10**9)
        raw["search"].update(max_concurrent=1, resources={"cpu": 2, "gpu": 0})
    raw["search"].pop("num_samples", None)
    raw["search"].update(keep_checkpoints=2, finalists={"top_k": 0})
    raw["wandb"] = {"mode": "disabled"}
    from tune_llama.spec import spec_from_dict
    return spec_from_dict(raw, SETTINGS[name]["overrides"] + args.overrides).to_dict()


def with_fields(spec: dict, **training) -> dict:
    out = json.loads(json.dumps(spec))
    out["training"].update(training)
    return out


def test_problems(spec: dict, limit: int):
    from tune_llama.data import load_test
    from tune_llama.spec import spec_from_dict
    problems = load_test(spec_from_dict(spec).data)
    return problems[:limit] if limit else problems


# ---------------------------------------------------------------- the three contenders

def run_search(spec: dict, budget: float, seed: int, folder: Path) -> dict:
    """(s): a real search in a subprocess, as a user runs it, then its export."""
    from tune_llama.export import EXPORT_FILE, export
    from tune_llama.results import load_search
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    name = "search"
    if not (folder / name / "summary.txt").is_file():
        if (folder / name).is_dir():  # a bench killed mid-search: the search resumes where it was
            command = [sys.executable, "-m", "tune_llama.search", "--resume", str(folder / name)]
        else:
            command = [sys.executable, "-m", "tune_llama.search", str(spec_file), "--storage", str(folder), "--name",
                       name, "--set", f"search.budget={budget:g}", "--set", f"search.seed={seed}",
                       "--set", f"training.seed={seed}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO),
                                                                          os.environ.get("PYTHONPATH")]))}
        common.say("search: " + shlex.join(command))
        code = subprocess.run(command, cwd=common.REPO, env=env, stdout=sys.stderr).returncode
        if code:
            sys.exit(f"the search exited {code}; see {folder / name}")
    out = export(folder / name, folder / "export")
    info = json.loads((out / EXPORT_FILE).read_text())
    found = load_search(folder / name)
    epochs = sum(max(r["epoch"] for r in t.rows) for t in found.trials if t.rows)
    run_epochs = found.spec.training.epochs
    return {"model": str(out), "val_loss": info["metrics"].get("eval_loss"), "trial_epochs": epochs,
            "runs_spent": epochs / run_epochs, "trials": len(found.trials), "winner": info["trial_id"],
            "winner_params": info["params"], "winner_epoch": info["epoch"], "folder": str(folder / name)}


def train_run(spec: dict, folder: Path) -> dict:
    """One ``tune-llama train`` run; its best report's model in ``folder/best``."""
    from tune_llama.spec import spec_from_dict
    from tune_llama.train import train
    if not (folder / "best").is_dir():
        with contextlib.redirect_stdout(sys.stderr):  # its report lines are progress, not the result
            summary = train(spec_from_dict(spec), folder)
        if "best_model" not in summary:
            sys.exit(f"{folder}: the run ended {summary['status']} with no finite validation loss")
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    best = min(history, key=lambda r: r["eval_loss"])
    return {"model": str(folder / "best"), "val_loss": best["eval_loss"], "history": history}


def longer_run(spec: dict, budget: int, seed: int, folder: Path) -> dict:
    """(e1): the recipe for K times its epochs in one run."""
    return train_run(with_fields(spec, epochs=spec["training"]["epochs"] * budget, seed=seed), folder)


def best_of_seeds(spec: dict, budget: int, seed: int, folder: Path) -> dict:
    """(e2): K runs of the recipe with seeds seed + 1000 j; the lowest validation loss is kept."""
    runs = {seed + 1000 * j: train_run(with_fields(spec, seed=seed + 1000 * j), folder / f"seed{seed + 1000 * j}")
            for j in range(budget)}
    picked, best = min(runs.items(), key=lambda item: item[1]["val_loss"])
    return {**best, "picked_seed": picked, "seeds": {s: r["val_loss"] for s, r in runs.items()}}


# ---------------------------------------------------------------- scoring

def held_out_loss(model: str, spec: dict, problems) -> float:
    """Teacher-forced mean loss per gold answer token, every answer whole (nothing dropped or cut)."""
    from tune_llama.data import encode
    from tune_llama.evaluate import load
    from tune_llama.loop import pick_device, setup, validation_loss
    from tune_llama.spec import spec_from_dict
    measure = spec_from_dict({**spec, "data": {**spec["data"], "max_length": 1 << 16, "overlong": "truncate",
                                               "train_size": None}})
    loaded = load(model, pick_device("auto"))
    encoded = encode(problems, loaded.tokenizer, measure.data)
    run = setup(measure, model=loaded.model, tokenizer=loaded.tokenizer, data=(encoded, encoded))
    loss = validation_loss(run, encoded)
    del run, loaded
    common.free_memory()
    return loss


def paired(deltas: list[float]) -> dict:
    """Mean of per-seed differences with a 95% t interval (None with one seed)."""
    mean = statistics.fmean(deltas)
    if len(deltas) < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None}
    half = T_975[min(len(deltas) - 1, len(T_975)) - 1] * statistics.stdev(deltas) / math.sqrt(len(deltas))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def sentence(setting: str, budget: int, stats: dict, rel: dict, n: int) -> str:
    if stats["ci_high"] is None:
        verdict = "one seed: no interval"
    elif stats["ci_high"] < 0:
        verdict = "the search is better: the interval lies below 0"
    elif stats["ci_low"] > 0:
        verdict = "the recipe is better: the interval lies above 0"
    else:
        verdict = "not distinguishable over these seeds"
    interval = "" if stats["ci_high"] is None else f" [95% CI {stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]"
    return (f"{setting}, K={budget}: (s) - min(e1, e2) = {stats['mean']:+.4f}{interval} held-out loss over {n} "
            f"seeds ({rel['mean']:+.1%} relative); {verdict}")


# ---------------------------------------------------------------- the plot

def plot(setting: str, seeds: dict, budget: int, out: Path) -> Path:
    from tune_llama.plots import best_so_far_figure, save, spent_and_best
    from tune_llama.results import load_search
    curves = []
    for seed, row in sorted(seeds.items()):
        found = load_search(row[f"s{budget}"]["folder"])
        run_epochs = found.spec.training.epochs
        curves.append(("search (s), one line per seed", spent_and_best(found), "C0"))
        e1 = [(r["epoch"] / run_epochs, r["eval_loss"]) for r in row[f"e1_{budget}"]["history"]]
        curves.append((f"recipe x{budget} in one run (e1), one line per seed", running_best(e1), "C1"))
    fig = best_so_far_figure(curves, title=f"{setting}: best validation loss so far, K = {budget}", metric="eval_loss")
    return save(fig, out / f"equal_compute_{setting}.png")


def running_best(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    best, out = math.inf, []
    for x, y in points:
        best = min(best, y)
        out.append((x, best))
    return out


# ---------------------------------------------------------------- main

def arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", action="append", choices=SETTINGS, help="run this setting (repeatable; default all)")
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 4], metavar="K", help="budgets in runs (default 2 4)")
    p.add_argument("--seeds", type=int, help="seeds per setting (default: 8 for tiny and tiny-off, 3 for smollm2)")
    p.add_argument("--first-seed", type=int, default=0, metavar="N", help="seeds N, N+1, ... (default 0)")
    p.add_argument("--data", default=str(common.GSM8K) if (common.GSM8K / "train.jsonl").is_file()
                   else "embedded:gsm8k-mini", help="GSM8K folder of the smollm2 setting (default %(default)s)")
    p.add_argument("--test", type=int, help="held-out problems scored (default: 200 synthetic, 64 GSM8K)")
    p.add_argument("--out", type=Path, help="run folders (default results/equal-compute-TIME); an existing one "
                                            "resumes: finished runs are read back, not run again")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any spec field of every contender (repeatable)")
    p.add_argument("--smoke-test", action="store_true", help="one seed of tiny-off at K = 2 (about two minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.setting, args.budgets, args.seeds = args.setting or ["tiny-off"], [2], 1
    args.setting = args.setting or list(SETTINGS)
    if any(k < 1 for k in args.budgets):
        p.error(f"--budgets: whole numbers of runs >= 1, got {args.budgets}")
    return args


def main(argv=None) -> int:
    args = arguments(argv)
    specs = {name: setting_spec(name, args) for name in args.setting}  # a bad --set fails before any work
    common.start(args)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    out = (args.out or common.REPO / "results" / f"equal-compute-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    record_file = out / "equal_compute.json"
    raw = json.loads(record_file.read_text()) if record_file.is_file() else {}
    payload = {"command": command, "machine": machine(), "budgets": args.budgets, "settings": {}}
    lines, notes = [], []
    for name in args.setting:
        spec = specs[name]
        synthetic = spec["data"]["source"] == "synthetic"
        problems = test_problems(spec, args.test or (0 if synthetic else SMOLLM2["test"]))
        n_seeds = args.seeds or SETTINGS[name]["seeds"]
        seeds = {}
        for seed in range(args.first_seed, args.first_seed + n_seeds):
            row = raw.get(name, {}).get(str(seed), {})
            here = out / name / f"seed{seed}"
            for budget in args.budgets:
                common.say(f"--- {name}, seed {seed}, K={budget}")
                for key, make in ((f"s{budget}", lambda: run_search(spec, budget, seed, here / f"s{budget}")),
                                  (f"e1_{budget}", lambda: longer_run(spec, budget, seed, here / f"e1_{budget}")),
                                  (f"e2_{budget}", lambda: best_of_seeds(spec, budget, seed, here / "e2"))):
                    if key not in row:
                        row[key] = make()
                        row[key]["held_out"] = held_out_loss(row[key]["model"], spec, problems)
                        raw.setdefault(name, {})[str(seed)] = row
                        record_file.write_text(json.dumps(raw, indent=1))  # a killed bench resumes here
            seeds[seed] = row
        figures = {}
        for budget in args.budgets:
            deltas, rels = [], []
            for seed, row in sorted(seeds.items()):
                baseline = min(row[f"e1_{budget}"]["held_out"], row[f"e2_{budget}"]["held_out"])
                deltas.append(row[f"s{budget}"]["held_out"] - baseline)
                rels.append(row[f"s{budget}"]["held_out"] / baseline - 1)
                lines.append({"setting": name, "K": budget, "seed": seed,
                              "s": row[f"s{budget}"]["held_out"], "e1": row[f"e1_{budget}"]["held_out"],
                              "e2": row[f"e2_{budget}"]["held_out"], "delta": deltas[-1], "rel": rels[-1],
                              "runs": row[f"s{budget}"]["runs_spent"], "trials": row[f"s{budget}"]["trials"],
                              "winner_epoch": row[f"s{budget}"]["winner_epoch"]})
            stats, rel = paired(deltas), paired(rels)
            for key, value in stats.items():
                figures[f"equal_compute_K{budget}_delta_{key}"] = value
            figures[f"equal_compute_K{budget}_relative_mean"] = rel["mean"]
            figures[f"equal_compute_K{budget}_runs_spent_max"] = max(
                row[f"s{budget}"]["runs_spent"] for row in seeds.values())
            notes.append(sentence(name, budget, stats, rel, len(deltas)))
        png = plot(name, seeds, max(args.budgets), out)
        notes.append(f"{name}: plot {png}")
        payload["settings"][name] = {**figures, "seeds": {
            str(seed): {key: {k: v for k, v in value.items() if k != "history"} for key, value in row.items()}
            for seed, row in seeds.items()}, "held_out_problems": len(problems)}
    notes += [f"machine: {machine()}", f"command: {command}", f"runs in {out}"]
    (out / "summary.json").write_text(json.dumps(payload, indent=1))
    common.output(args, lines, [("setting", "setting"), ("K", "K"), ("seed", "seed"), ("s", "(s) search"),
                                ("e1", "(e1) recipe xK"), ("e2", "(e2) best of K seeds"),
                                ("delta", "(s) - min(e1, e2)"), ("rel", "relative"), ("runs", "runs spent"),
                                ("trials", "trials"), ("winner_epoch", "winner's epoch")],
                  payload, "\n".join(notes))
    return 0


def machine() -> str:
    import torch
    if common.cuda():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs, no GPU, load average {os.getloadavg()[0]:.1f}"


if __name__ == "__main__":
    from tune_llama.cli import run_cli
    run_cli(main)
