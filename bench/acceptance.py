"""The checks of ``bench/gpu_check.sh`` that need more than one command: each prints ``goal | measured`` lines.

    python bench/acceptance.py concurrency-goal FILE.json      # a. from bench/concurrency.py --json
    python bench/acceptance.py kill-resume SPEC --storage DIR [--set K=V ...]   # b.
    python bench/acceptance.py quantized --model random:tinyllama-1.1b          # c. (CUDA)
    python bench/acceptance.py generate EXPORT [--limit 64]                     # d.
    python bench/acceptance.py oom SPEC --storage DIR [--set K=V ...]           # e.

Each stage but concurrency-goal (which reads a file) takes ``--smoke-test``: ``bench/gpu_check.sh
--smoke-test``'s sizes on CPU (random:tiny, small searches; e injects the OOM above 8 rows).

A line reads ``STAGE: GOAL | measured: FIGURES -> met`` (or ``NOT met``, or ``n/a`` where the machine cannot
tell, e.g. no CUDA). Nothing is patched: searches run through ``python -m tune_llama.search``, steps through
the loop's public functions, generation through ``tune_llama.generate``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)


def goal(stage: str, wanted: str, measured: str, met) -> None:
    verdict = "n/a" if met is None else ("met" if met else "NOT met")
    print(f"{stage}: {wanted} | measured: {measured} -> {verdict}", flush=True)


def search_cmd(spec: str, storage: Path, name: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "tune_llama.search", spec, "--name", name, "--storage", str(storage),
            *[a for s in sets for a in ("--set", s)]]


# ---------------------------------------------------------------- a. trials per GPU

def concurrency_goal(args) -> int:
    # The JSON object is the last line: Ray's Tuner prints its tables on stdout too.
    figures = json.loads([line for line in Path(args.file).read_text().splitlines() if line.startswith("{")][-1])
    peaks = figures.pop("peak_memory_gb", {})
    per_hour = list(figures.items())  # in --gpu-shares order: 1 trial per GPU first
    base_name, base = per_hour[0]
    for name, value in per_hour:
        peak = f", peak {peaks[name]:.1f} GiB per trial" if name in peaks else ""
        print(f"a. {name}: {value:.0f} trial-steps/h = {value / base:.2f}x {base_name}{peak}")
    last_name, last = per_hour[-1]
    goal("a. trials per GPU", f"{last_name} >= 2.5x the trial-steps/h of {base_name}",
         f"{last / base:.2f}x ({last:.0f} vs {base:.0f} trial-steps/h)", last / base >= 2.5 if args.gpu else None)
    return 0


# ---------------------------------------------------------------- b. kill and resume

def kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL the search's process group, then any process of its session that left the group (Ray's)."""
    if leader.poll() is None:
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == leader.pid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


def kill_resume(args) -> int:
    from tune_llama.results import read_result_rows
    experiment = args.storage / "killed"
    log = args.storage / "killed.log"
    with log.open("w") as out:
        leader = subprocess.Popen(search_cmd(args.spec, args.storage, "killed", args.set), start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    started, deadline = time.monotonic(), time.monotonic() + args.timeout
    while len(list(experiment.glob("*/checkpoint_*"))) < args.checkpoints:
        if leader.poll() is not None or time.monotonic() > deadline:
            ended = f"the search ended first (exit {leader.returncode})" if leader.poll() is not None else "timed out"
            print(f"b. {ended}; its output ends: " + " / ".join(log.read_text().splitlines()[-5:]))
            goal("b. kill and resume", "SIGKILL after the first checkpoints", ended, False)
            kill_session(leader)
            return 1
        time.sleep(0.2)
    killed_after = time.monotonic() - started
    kill_session(leader)
    checkpointed = {p.parent.name for p in experiment.glob("*/checkpoint_*")}
    begin = time.monotonic()
    resumed = subprocess.run([sys.executable, "-m", "tune_llama.search", "--resume", str(experiment)],
                             capture_output=True, text=True, timeout=args.timeout)
    resume_s = time.monotonic() - begin
    summary = (experiment / "summary.txt").read_text() if (experiment / "summary.txt").exists() else ""
    counts = next((line for line in summary.splitlines() if line.startswith("trials:")), "no summary")
    restarted = []
    for trial in checkpointed:
        numbers = [r["report"] for r in read_result_rows(experiment / trial / "result.json")]
        if len(numbers) != len(set(numbers)):
            restarted.append(trial)
    print(f"b. killed after {killed_after:.0f} s with {len(checkpointed)} trials checkpointed; resume ran "
          f"{resume_s:.0f} s, exit {resumed.returncode}; {counts}")
    goal("b. kill and resume", "every trial ends after --resume", counts,
         resumed.returncode == 0 and "0 unfinished" in counts)
    goal("b. kill and resume", "no checkpointed trial restarts",
         f"{len(restarted)} of {len(checkpointed)} restarted {restarted or ''}".strip(), not restarted)
    return 0 if resumed.returncode == 0 else 1


# ---------------------------------------------------------------- c. QLoRA and 8-bit AdamW

def quantized(args) -> int:
    if not common.cuda():
        for what in ("QLoRA 4-bit", "adamw_8bit"):
            goal(f"c. {what}", "loss falls on CUDA; memory vs bf16 LoRA", "not run: no CUDA here", None)
        return 0
    import tempfile
    import torch
    from tune_llama.loop import peak_memory_gb, setup
    from tune_llama.model import load_tokenizer, random_model
    if args.model.startswith("random:"):
        # Random shapes are built in code, never quantized: saved and loaded by path, the model goes through
        # from_pretrained with bitsandbytes as a real checkpoint does. The same weights serve every mode.
        spec = common.make_spec(args)
        tokenizer = load_tokenizer(spec.model)
        folder = Path(tempfile.mkdtemp(prefix="acceptance-model-"))
        model = random_model(spec.model, tokenizer, torch.device("cuda"), seed=0)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        args.model = str(folder)
    modes = {"bf16 LoRA (adamw)": [], "QLoRA 4-bit (adamw)": ["model.quantization=4bit"],
             "bf16 LoRA (adamw_8bit)": ["training.optimizer=adamw_8bit"]}
    found = {}
    for name, overrides in modes.items():
        common.free_memory(torch.device("cuda"))
        run = setup(common.make_spec(args, "training.lr=1e-3", *overrides))
        common.train_steps(run, args.warmup)
        losses = []
        for _ in range(args.steps):
            _, interval = common.train_steps(run, 1)
            losses.append(interval.mean_loss())
        found[name] = (losses, peak_memory_gb(run.device))
        print(f"c. {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps, "
              f"peak {found[name][1]:.2f} GiB")
        del run
    base_peak = found["bf16 LoRA (adamw)"][1]
    for name in list(modes)[1:]:
        losses, peak = found[name]
        first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
        goal(f"c. {name}", "loss falls; memory printed against bf16 LoRA",
             f"loss {first:.3f} -> {last:.3f}, peak {peak:.2f} GiB vs {base_peak:.2f} GiB ({peak / base_peak:.2f}x)",
             last < first)
    return 0


# ---------------------------------------------------------------- d. generation speed

def generate_speed(args) -> int:
    import torch
    from tune_llama.data import format_prompt
    from tune_llama.evaluate import data_spec, load, problems_for
    from tune_llama.generate import generate_texts
    device = torch.device("cuda" if common.cuda() else "cpu")
    loaded = load(args.model, device)
    problems = problems_for(data_spec(args.data, loaded.prompt_template, loaded.data), "test")[:args.limit]
    prompts = sorted((format_prompt(loaded.prompt_template, p["question"]) for p in problems), key=len)
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    tok = loaded.tokenizer

    def plain(batch):  # what a user writes: left-padded batch, greedy, stop at EOS or the budget
        tok.padding_side = "left"
        enc = tok(batch, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            loaded.model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)

    timings = {}
    contenders = {"plain model.generate": plain,
                  "ours": lambda b: generate_texts(loaded.model, tok, b, args.max_new_tokens),
                  "ours --calculator": lambda b: generate_texts(loaded.model, tok, b, args.max_new_tokens, True)}
    for name, fn in contenders.items():
        fn(batches[0][:2])  # warm-up (kernels, caches)
        common.sync(device)
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        common.sync(device)
        timings[name] = len(prompts) / (time.perf_counter() - start)
        print(f"d. {name}: {timings[name]:.1f} problems/s ({len(prompts)} problems, batch {args.batch_size}, "
              f"{args.max_new_tokens} new tokens at most)")
    ratio = timings["ours"] / timings["plain model.generate"]
    goal("d. generation", "ours >= 1x plain model.generate problems/s, same prompts",
         f"{ratio:.2f}x ({timings['ours']:.1f} vs {timings['plain model.generate']:.1f} problems/s; "
         f"calculator {timings['ours --calculator']:.1f})", ratio >= 1.0)
    return 0


# ---------------------------------------------------------------- e. out of memory

def out_of_memory(args) -> int:
    from tune_llama.results import ERRORED, load_search
    proc = subprocess.run(search_cmd(args.spec, args.storage, "oom", args.set), capture_output=True, text=True,
                          timeout=args.timeout)
    search = load_search(args.storage / "oom")
    key = args.field
    errored = [t for t in search.trials if search.status(t) == ERRORED]
    went_on = [t for t in search.trials if search.status(t) != ERRORED and t.epochs > 0]
    summary = (args.storage / "oom" / "summary.txt").read_text().splitlines()
    for trial in search.trials:
        print(f"e. trial {trial.trial_id} {key}={trial.params.get(key)}: {search.status(trial)}, "
              f"{trial.epochs:g} epochs")
    lines = [next((s for s in summary if s.startswith(f"errored trial {t.trial_id}: ")), "") for t in errored]
    named = all(f"lower {key}" in line and "Traceback" not in line for line in lines)
    for line in lines:
        print(f"e. {line}")
    goal("e. OOM", "a trial that cannot fit halves and goes on, or errors with one line naming the field",
         f"{len(errored)} errored, one line naming {key}: {'yes' if named else 'no'}", named)
    goal("e. OOM", "the other trials go on", f"{len(went_on)} of {len(search.trials)} trained",
         len(went_on) + len(errored) == len(search.trials) and bool(went_on))
    goal("e. OOM", "search exits 0, or 3 with the errored trial named",
         f"exit {proc.returncode}; errored trials named in summary: {'yes' if all(lines) else 'no'}",
         proc.returncode in (0, 3) and all(lines))
    return 0


# ---------------------------------------------------------------- command line

# Each search stage's smoke sizes, ahead of the command line's --set (which wins).
SMOKE_SETS = {
    # Two trials side by side, 4 reports in their one epoch: time to kill one mid-epoch.
    "kill-resume": ["search.num_samples=2", "search.max_concurrent=2", "training.epochs=1", "training.eval_every=0.25",
                    "search.asha.grace_period=1", "data.synthetic_size=400"],
    "oom": ["search.space={data.batch_size: {choice: [4, 16]}, training.lr: {loguniform: [1.0e-3, 1.0e-2]}}"],
}


def smoke(args, parsers: dict[str, argparse.ArgumentParser]) -> None:
    """``--smoke-test``: the stage's sizes of ``bench/gpu_check.sh --smoke-test``, on CPU."""
    if args.stage in SMOKE_SETS:
        args.set = [*SMOKE_SETS[args.stage], *args.set]
    if args.stage == "oom":  # no GPU to fill: a forward of more than 8 rows raises CUDA's OOM (the tests' hook)
        os.environ.setdefault("TUNE_LLAMA_OOM_ABOVE_ROWS", "8")
    elif args.stage == "quantized":
        common.smoke_test(args, parsers["quantized"], **common.LOOP_SMOKE)
    elif args.stage == "generate":
        common.smoke_test(args, parsers["generate"], limit=16, max_new_tokens=32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    a = sub.add_parser("concurrency-goal")
    a.add_argument("file")
    a.add_argument("--gpu", action="store_true", help="the figures are GPU shares (the goal applies)")
    for name in ("kill-resume", "oom"):
        s = sub.add_parser(name)
        s.add_argument("spec")
        s.add_argument("--storage", type=Path, required=True)
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        s.add_argument("--timeout", type=float, default=300)
        s.add_argument("--checkpoints", type=int, default=2, help="kill once this many checkpoints exist")
        s.add_argument("--field", default="data.batch_size", help="the searched field that sets the memory")
        common.add_smoke_test(s)
    q = common.parser(__doc__, model="random:tinyllama-1.1b")
    q.prog = "quantized"
    c = sub.add_parser("quantized", parents=[q], add_help=False, conflict_handler="resolve")
    c.add_argument("--steps", type=int, default=12)
    c.add_argument("--warmup", type=int, default=1)
    g = sub.add_parser("generate")
    g.add_argument("model")
    g.add_argument("--data", default="synthetic")
    g.add_argument("--limit", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=128)
    common.add_smoke_test(g)
    args = p.parse_args(argv)
    if getattr(args, "smoke_test", False):
        smoke(args, {"quantized": c, "generate": g})
    if getattr(args, "storage", None):
        args.storage = args.storage.resolve()
        args.storage.mkdir(parents=True, exist_ok=True)
    return {"concurrency-goal": concurrency_goal, "kill-resume": kill_resume, "quantized": quantized,
            "generate": generate_speed, "oom": out_of_memory}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
