"""Finalists: the search's best few trials, re-ranked by what a user wants, GSM8K accuracy.

Validation loss is a proxy. After the search, the ``search.finalists.top_k``
best trials by ``search.metric`` are scored by greedy generation on
``limit`` validation problems (never the test split): strict and flexible
accuracy with a 95% Wilson interval. The winner has the best strict accuracy,
ties broken by validation loss. With ``seeds``, each finalist is retrained
with every extra seed and mean and spread decide. Each finalist runs as a Ray
task with the trials' resources; ``finalists.json`` is written after each one,
so a killed search's ``--resume`` scores only the finalists still missing.
``comparison`` in ``finalists.json`` says whether the winner really beats the
runner-up: their difference in strict accuracy on the same problems, paired
problem by problem (``tune_llama.paired``: exact McNemar and its 95% interval),
and with ``seeds`` the mean and spread of that difference over the seeds.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Optional

from tune_llama.paired import over_seeds, paired_difference, sentence
from tune_llama.paths import read_json, share_as_umask_allows
from tune_llama.resources import task_options
from tune_llama.results import FINALISTS_FILE, Search, load_search
from tune_llama.spec import FinalistsSpec, Spec


def validation_problems(spec: Spec, limit: int) -> list[dict[str, str]]:
    from tune_llama.data import load_splits
    return load_splits(spec.data).val[:limit]


def score_checkpoint(spec_dict: dict, checkpoint: str, finalists: dict, seed: Optional[int]) -> dict[str, Any]:
    """Accuracy of one finalist: its checkpoint as trained, or (``seed``) retrained from scratch with that seed."""
    import dataclasses
    import torch
    from tune_llama.evaluate import score
    from tune_llama.loop import fit, pick_device, setup, validation_loss
    from tune_llama.checkpoint import load_model
    from tune_llama.spec import spec_from_dict

    spec = spec_from_dict(spec_dict)
    f = FinalistsSpec(**finalists)
    device = pick_device(spec.training.device)
    if seed is None:
        model, tokenizer = load_model(spec.model, Path(checkpoint), device, seed=spec.training.seed)
        loss = None
    else:
        spec = dataclasses.replace(spec, training=dataclasses.replace(spec.training, seed=seed))
        run = fit(setup(spec))
        model, tokenizer, loss = run.model, run.tokenizer, validation_loss(run)
        model.eval()
    model.config.use_cache = True
    with torch.no_grad():
        result = score(model, tokenizer, validation_problems(spec, f.limit), spec.data.prompt_template,
                       batch_size=f.batch_size, max_new_tokens=f.max_new_tokens, calculator=f.calculator)
    return {"seed": seed, "strict": result["strict"], "flexible": result["flexible"], "n": result["n"],
            "eval_loss": loss, "seconds": result["seconds"]}


def summarize_scores(trial_id: str, checkpoint: Path, row: dict, metric: str, scores: list[dict]) -> dict[str, Any]:
    strict = [s["strict"]["accuracy"] for s in scores]
    losses = [s["eval_loss"] for s in scores if s["eval_loss"] is not None] or [row.get("eval_loss")]
    first = scores[0]
    return {
        "trial_id": trial_id, "checkpoint": str(checkpoint), "report": row.get("report"), "epoch": row.get("epoch"),
        "metric": metric, "metric_value": row.get(metric),
        "strict_accuracy": statistics.fmean(strict), "strict_spread": statistics.pstdev(strict) if len(strict) > 1
        else 0.0, "strict_ci95": first["strict"]["ci95"],
        "flexible_accuracy": statistics.fmean(s["flexible"]["accuracy"] for s in scores),
        "eval_loss": statistics.fmean(losses), "n": first["n"], "scores": scores,
    }


def rank_key(entry: dict[str, Any]) -> tuple[float, float]:
    """Best strict accuracy first; among equals, the lower validation loss."""
    return -entry["strict_accuracy"], entry["eval_loss"]


def winner(entries: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not entries:
        return None
    best = min(entries, key=rank_key)
    return {"trial_id": best["trial_id"], "checkpoint": best["checkpoint"],
            "strict_accuracy": best["strict_accuracy"], "eval_loss": best["eval_loss"]}


def compare_to_runner_up(entries: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The winner minus the runner-up, strict accuracy, paired on the same validation problems: on the
    checkpoints as trained, and (with ``seeds``) seed by seed. None with fewer than two finalists, or for
    scores written before per-problem results were kept."""
    if len(entries) < 2 or any("per_problem" not in s["strict"] for e in entries for s in e["scores"]):
        return None
    first, second = sorted(entries, key=rank_key)[:2]
    runs = [(a["strict"]["per_problem"], b["strict"]["per_problem"]) for a, b in zip(first["scores"], second["scores"])]
    result = {"winner": first["trial_id"], "runner_up": second["trial_id"], **paired_difference(*runs[0])}
    result["sentence"] = sentence(result, f"the winner ({first['trial_id']})", f"the runner-up ({second['trial_id']})")
    if len(runs) > 1:
        result["over_seeds"] = over_seeds(runs)
    return result


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".finalists-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    share_as_umask_allows(Path(tmp))  # mkstemp made it 0600
    os.replace(tmp, path)  # a reader never sees half a file


def score_finalists(search_dir: Path, resources: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Score the top-k trials (as Ray tasks when Ray is up), write ``finalists.json``, print the table."""
    search = load_search(search_dir)
    f = search.spec.search.finalists
    path = search.path / FINALISTS_FILE
    done = {e["trial_id"]: e for e in (read_json(path) or {}).get("finalists", [])}
    entries = []
    for trial, row in search.ranked()[:f.top_k]:
        if trial.trial_id in done:
            entries.append(done[trial.trial_id])
            continue
        checkpoint = trial.best_checkpoint(search.metric, search.mode)
        if checkpoint is None:
            continue
        spec_dict = search.trial_spec(trial).to_dict()
        seeds = [None] + list(f.seeds)
        scores = run_tasks(spec_dict, str(checkpoint.path), f, seeds, resources)
        entries.append(summarize_scores(trial.trial_id, checkpoint.path, checkpoint.metrics, search.metric, scores))
        write_atomically(path, finalists_record(search, f, entries))
    record = finalists_record(search, f, entries)
    write_atomically(path, record)
    print_finalists(record)
    return record


def run_tasks(spec_dict: dict, checkpoint: str, f: FinalistsSpec, seeds: list, resources) -> list[dict]:
    import dataclasses
    try:
        import ray
    except ImportError:
        ray = None
    finalists = dataclasses.asdict(f)
    if ray is None or not ray.is_initialized():
        return [score_checkpoint(spec_dict, checkpoint, finalists, seed) for seed in seeds]
    task = ray.remote(**task_options(resources or {"cpu": 1, "gpu": 0}))(score_checkpoint)
    return ray.get([task.remote(spec_dict, checkpoint, finalists, seed) for seed in seeds])


def finalists_record(search: Search, f: FinalistsSpec, entries: list[dict]) -> dict[str, Any]:
    return {"split": "validation", "limit": f.limit, "top_k": f.top_k, "seeds": list(f.seeds),
            "calculator": f.calculator, "metric": search.metric, "finalists": entries, "winner": winner(entries),
            "comparison": compare_to_runner_up(entries)}


def print_finalists(record: dict[str, Any]) -> None:
    print(f"\nfinalists: GSM8K accuracy on {record['limit']} validation problems")
    for e in record["finalists"]:
        spread = f" ± {e['strict_spread']:.1%}" if e["strict_spread"] else ""
        print(f"  {e['trial_id']}  strict {e['strict_accuracy']:.1%}{spread} "
              f"[{e['strict_ci95'][0]:.1%}, {e['strict_ci95'][1]:.1%}]  flexible {e['flexible_accuracy']:.1%}  "
              f"{e['metric']}={e['metric_value']:.4f}")
    if record["winner"]:
        print(f"  winner: {record['winner']['trial_id']} (export takes it; --by loss takes the best loss)")
    if record.get("comparison"):
        print(f"  {comparison_text(record['comparison'])}")


def comparison_text(c: dict[str, Any]) -> str:
    """The paired comparison's sentence, and with seeds the difference's mean and spread over them."""
    text = c["sentence"]
    if c.get("over_seeds"):
        s = c["over_seeds"]
        text += (f"; over {s['seeds']} seeds (the checkpoint's and each retrained one) the difference is "
                 f"{s['difference_mean']:+.1%} ± {s['difference_spread']:.1%}, the winner better in {s['better_in']}"
                 f", worse in {s['worse_in']}")
    return text
