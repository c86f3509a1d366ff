"""What a real search prints: the trial table in 100 columns with each trial's final status, what it waits for,
and the trials' progress between reports."""

from __future__ import annotations

import json
import re

from tune_llama.progress_bar import WIDTH


def test_the_search_printed_the_table_in_100_columns_with_each_trials_final_status(tiny_search):
    truth = {}
    for result in tiny_search.glob("*/result.json"):
        reports = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        truth[reports[0]["trial_id"]] = reports
    lines = (tiny_search.parent / "search.log").read_text().splitlines()
    titles = [i for i, line in enumerate(lines) if re.match(r"\[\d\d:\d\d:\d\d\] \d+ of 6 trials: ", line)]
    assert titles, "\n".join(lines[-50:])
    tables = []
    for start in titles:  # a title, the metric, a header, then one row per trial
        end = start + 3
        while end < len(lines) and lines[end].split()[:1] and lines[end].split()[0] in truth:
            end += 1
        tables.append(lines[start:end])
    assert all(len(line) <= WIDTH for table_lines in tables for line in table_lines)
    last = tables[-1]
    status = {trial_id: "finished" if reports[-1]["epoch"] == 4 else "stopped at rung"
              for trial_id, reports in truth.items()}
    done = sum(s == "finished" for s in status.values())
    assert last[0].endswith(f"6 of 6 trials: {done} finished, {6 - done} stopped at rung"), last[0]
    rows = {line.split()[0]: line for line in last[3:]}
    assert set(rows) == set(truth)
    for trial_id, reports in truth.items():
        line = rows[trial_id]
        assert line.endswith(status[trial_id]) and f"{reports[-1]['epoch']:.2f}/4" in line
        assert f"{min(r['eval_loss'] for r in reports):.4f}" in line
        assert re.search(rf" optim\w*={reports[0]['config']['training.optimizer']} ", line)


def test_the_search_says_what_it_waits_for_and_trials_push_progress_without_extra_reports(tiny_search):
    from tune_llama.live import LIVE_DIR, read_live
    log = (tiny_search.parent / "search.log").read_text()
    first_table = re.search(r"\[\d\d:\d\d:\d\d\] \d+ of 6 trials: ", log).start()
    assert re.search(r"\] starting Ray; meanwhile checking the model \(preflight\)", log[:first_table])
    assert re.search(r"\] Ray is up \(\d+ CPUs\); preflight passed \(80 train, 16 validation examples\); "
                     r"starting up to 1 trial at once", log[:first_table])
    for trial_id, reports in {json.loads(r.read_text().splitlines()[0])["trial_id"]: [
            json.loads(line) for line in r.read_text().splitlines()] for r in tiny_search.glob("*/result.json")}.items():
        live = read_live(tiny_search / LIVE_DIR / f"{trial_id}.json")
        assert live is not None and live["step"] == reports[-1]["step"], "the last write is at the last step"
        # Tune saw one result per report point and no more: the side channel added no row (no ASHA rung).
        assert [r["report"] for r in reports] == list(range(1, len(reports) + 1))
        assert [r["training_iteration"] for r in reports] == [r["report"] for r in reports]
