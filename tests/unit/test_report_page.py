"""report.html names the best trial and the finalists' winner in their rows, with each finalist's GSM8K
accuracy; the report marks TPE's random start-up trials; a log axis reads in plain numbers."""

from __future__ import annotations

import html
import json
import re

from conftest import TINY
from tune_llama.results import FINALISTS_FILE, Search, Trial
from tune_llama.spec import load_spec


def a_search(path, losses: dict[str, float]) -> Search:
    """A finished search in ``path`` whose trials ended at the given validation losses (2 epochs each)."""
    spec = load_spec(TINY, ["training.epochs=2"])
    trials = [Trial(trial_id, None, {"training.lr": 1e-3, "training.gradient_accumulation_steps": 1,
                                     "training.optimizer": "adamw"},
                    [{"step": s, "report": s, "epoch": float(s), "eval_loss": loss + 0.1 * (2 - s),
                      "eval_perplexity": 2.718 ** (loss + 0.1 * (2 - s)),
                      "status": "completed" if s == 2 else "running"}
                     for s in (1, 2)]) for trial_id, loss in losses.items()]
    return Search(path, spec, trials)


def test_the_best_trial_and_the_finalists_winner_are_highlighted_and_named_with_their_accuracy(tmp_path):
    from tune_llama.report import trial_rows
    from tune_llama.report_html import write_html
    search = a_search(tmp_path, {"aaaa": 1.0, "bbbb": 1.2, "cccc": 1.5})
    finalists = {"finalists": [{"trial_id": "aaaa", "strict_accuracy": 0.25, "strict_ci95": [0.1, 0.4],
                                "flexible_accuracy": 0.3, "metric_value": 1.0},
                               {"trial_id": "bbbb", "strict_accuracy": 0.625, "strict_ci95": [0.4, 0.8],
                                "flexible_accuracy": 0.7, "metric_value": 1.2}],
                 "winner": {"trial_id": "bbbb"}}
    (tmp_path / FINALISTS_FILE).write_text(json.dumps(finalists))
    page = write_html(search, trial_rows(search), finalists, None, [], tmp_path / "report.html").read_text()
    table = page.split("<h2>Trials</h2>")[1].split("</table>")[0]
    rows = re.findall(r"<tr( class='[^']*')?><td>([^<]*)</td>.*?</tr>", table)
    assert rows == [(" class='best'", "aaaa (best)"), (" class='winner'", "bbbb (winner)"), ("", "cccc")]
    header = page.split("<h2>Trials</h2>")[1].split("</thead>")[0]
    assert "GSM8K strict" in header
    body = page.split("<h2>Trials</h2>")[1].split("</table>")[0]
    assert "<td>62.5%</td>" in body and "<td>25.0%</td>" in body
    assert "winner: the finalists' winner by GSM8K accuracy, the one export takes" in html.unescape(page)


def test_without_finalists_the_best_is_highlighted_and_no_accuracy_column_is_shown(tmp_path):
    from tune_llama.report import trial_rows
    from tune_llama.report_html import write_html
    search = a_search(tmp_path, {"aaaa": 1.3, "bbbb": 1.2})
    page = write_html(search, trial_rows(search), None, None, [], tmp_path / "report.html").read_text()
    assert "<tr class='best'><td>bbbb (best)</td>" in page and "GSM8K strict" not in page


def test_the_report_marks_tpes_random_start_up_trials_from_the_searchs_record(tmp_path):
    from tune_llama.report import format_table, trial_rows
    from tune_llama.summary import SAMPLER_FILE, sampler_line
    search = a_search(tmp_path, {"aaaa": 1.3, "bbbb": 1.2, "cccc": 1.1})
    for number, trial in enumerate(search.trials, 1):  # Tune's folder names carry the order it created them in
        trial.path = tmp_path / f"train_trial_{trial.trial_id}_{number}_x"
    (tmp_path / SAMPLER_FILE).write_text(json.dumps({"sampler": "tpe", "startup_trials": 2, "given": 1}))
    rows = {r["trial"]: r["drawn"] for r in trial_rows(search)}
    assert rows == {"aaaa": "given", "bbbb": "random", "cccc": "tpe"}
    assert "drawn" in format_table(search, trial_rows(search)).splitlines()[0]
    assert sampler_line(search) == ("sampler: TPE after 2 start-up trials (1 given, 1 random); 1 of 3 trials "
                                    "proposed by TPE")


def test_the_perplexity_axis_reads_in_plain_numbers(tmp_path):
    from tune_llama.plots import curves_figure
    search = a_search(tmp_path, {"aaaa": 1.5, "bbbb": 1.7})  # perplexities between 4.5 and 6.7: less than a decade
    fig = curves_figure(search, "eval_perplexity", log_y=True)
    fig.canvas.draw()
    axis = fig.axes[0]
    labels = [t.get_text() for t in axis.get_yticklabels() + axis.get_yticklabels(minor=True) if t.get_text()]
    assert labels and not [label for label in labels if re.search(r"times|\^|mathdefault|e[+-−]", label)], labels
    assert {"5", "6"} <= set(labels), labels
