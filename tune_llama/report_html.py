"""The report's one self-contained ``report.html``: the trial table, the finalists, parameter importance and
the plots, images inline."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Optional

from tune_llama.finalists import comparison_text
from tune_llama.plots import Importance
from tune_llama.results import Search
from tune_llama.summary import answer_lines, sampler_line, warm_start_line


def caption(image: Path, metric: str) -> str:
    """What a plot shows, in words (its file name is for the folder, not for the reader)."""
    words = {"eval_loss": "Validation loss per report, one line per trial",
             "eval_perplexity": "Validation perplexity per report, one line per trial (log scale)",
             f"{metric}_vs_lr": f"Each trial's best {metric} against its learning rate",
             "parallel_coordinates": f"Searched parameters of each trial against its best {metric}",
             "param_importance": "Which searched parameter mattered most (Optuna PED-ANOVA)",
             "best_so_far": f"The best {metric} so far against the compute spent, in runs of training.epochs"}
    return words.get(image.stem, image.stem.replace("_", " "))


def html_table(headers: list[str], rows: list[list[Any]], classes: Optional[list[str]] = None) -> str:
    """``classes``: a CSS class per row ('' for none)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join((f"<tr class='{name}'>" if name else "<tr>")
                   + "".join(f"<td>{html.escape(cell(c))}</td>" for c in row) + "</tr>"
                   for row, name in zip(rows, classes or [""] * len(rows)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(search: Search, rows: list[dict[str, Any]], finalists: Optional[dict]) -> list[str]:
    """The trial table, best first, the best trial (by ``search.metric``) and the finalists' winner (the one
    ``export`` takes) highlighted and named in their row, each finalist's GSM8K accuracy in a column of its own."""
    keys = list(search.spec.search.space)
    best = search.best()
    best_id = best[0].trial_id if best else None
    winner_id = ((finalists or {}).get("winner") or {}).get("trial_id")
    marks = {best_id: "best", winner_id: "winner"} if winner_id != best_id else {best_id: "best winner"}
    accuracy = any(r.get("finalist_strict_accuracy") is not None for r in rows)
    headers = ["trial", *keys, "status", "drawn", "epochs", "best eval_loss", "best ppl", "best@epoch",
               *(["GSM8K strict"] if accuracy else []), "error"]
    cells = [[r["trial"] + (f" ({marks[r['trial']]})" if r["trial"] in marks else ""), *[r[k] for k in keys],
              r["status"], r.get("drawn"), r["epochs"], r["best_eval_loss"], r["best_eval_perplexity"], r["best_epoch"],
              *([percent(r.get("finalist_strict_accuracy"))] if accuracy else []), r["error"]] for r in rows]
    said = [f"best: the best trial by {search.metric}"] + (
        ["winner: the finalists' winner by GSM8K accuracy, the one export takes"] if winner_id else [])
    return [f"<p class='legend'>{html.escape('; '.join(said))}</p>" if best_id else "",
            html_table(headers, cells, [marks.get(r["trial"], "") for r in rows])]


def percent(value: Optional[float]) -> Optional[str]:
    return f"{value:.1%}" if isinstance(value, (int, float)) else None


def write_html(search: Search, rows: list[dict[str, Any]], finalists: Optional[dict],
               importance: Optional[Importance], images: list[Path], out: Path, overlong: str = "") -> Path:
    """One file, images inline as data URIs: it opens anywhere, offline, and can be mailed as is."""
    parts = [f"<h1>{html.escape(search.name)}</h1>",
             f"<p>metric <b>{html.escape(search.metric)}</b> ({search.mode}); {len(rows)} trials of "
             f"{search.spec.search.num_samples}; training.epochs={search.spec.training.epochs}</p>",
             *(f"<p><b>{html.escape(line)}</b></p>" for line in answer_lines(search)),
             *(f"<p>{html.escape(line)}</p>" for line in filter(None, [sampler_line(search), warm_start_line(search)])),
             "<h2>Trials</h2>", *trials_table(search, rows, finalists)]
    if overlong:
        parts.append(f"<p>{html.escape(overlong)}</p>")
    if finalists:
        parts += ["<h2>Finalists (GSM8K accuracy)</h2>", html_table(
            ["trial", "strict", "strict 95% CI", "flexible", search.metric],
            [[f["trial_id"], f"{f['strict_accuracy']:.1%}", f"{f['strict_ci95'][0]:.1%} - {f['strict_ci95'][1]:.1%}",
              f"{f['flexible_accuracy']:.1%}", f["metric_value"]] for f in finalists.get("finalists", [])])]
        if finalists.get("comparison"):
            parts.append(f"<p>{html.escape(comparison_text(finalists['comparison']))}</p>")
    if importance:
        parts += [f"<h2>Parameter importance{html.escape(importance.caveat)}</h2>",
                  html_table(["param", "importance"], [[k, v] for k, v in importance.items()])]
    pngs = [p for p in images if p.suffix == ".png"]
    if pngs:
        parts.append("<h2>Plots</h2>")
        parts += [f'<figure><img alt="{html.escape(caption(p, search.metric))}" src="data:image/png;base64,'
                  f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>'
                  f'{html.escape(caption(p, search.metric))}</figcaption></figure>' for p in pngs]
    else:
        parts.append("<p>Nothing to plot yet: no trial has reported a result.</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
             "tr.best td{background:#fff3c4;font-weight:bold}tr.winner td{background:#dcf3d8;font-weight:bold}"
             ".legend{font-size:13px;color:#555}")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(search.name)}</title>"
                   f"<style>{style}</style></head><body>{''.join(parts)}</body></html>", encoding="utf-8")
    return out
