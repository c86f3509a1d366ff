"""Progress people can read: the search's trial table in 100 columns, and the bar of a long run that
becomes a plain line every interval (and one at the end) when the output is not a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from conftest import TINY
from tune_llama.progress_bar import WIDTH, Progress, eta_seconds, format_duration, plain_line
from tune_llama.trial_table import MAX_ROWS, short_name, table
from tune_llama.spec import load_spec, spec_from_dict


PLAIN = re.compile(r"^(?P<desc>[\w ]+): (?P<position>\d+)/(?P<total>\d+) (?P<unit>\w+)s \((?P<pct>\d+)%\)"
                   r"(, (?P<elapsed>[\d:]+) elapsed, ETA (?P<eta>[\d:?]+)| in (?P<took>[\d:]+))$")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def seconds(text: str) -> int:
    parts = [int(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


# ---------------------------------------------------------------- ETA and plain lines

def test_eta_is_the_units_left_at_the_average_rate_so_far():
    assert eta_seconds(25, 75, 50.0) == 150.0
    assert eta_seconds(100, 0, 80.0) == 0.0
    assert eta_seconds(0, 100, 5.0) is None  # no rate yet
    assert format_duration(150) == "02:30" and format_duration(3725) == "1:02:05" and format_duration(0) == "00:00"
    assert plain_line("train", 25, 100, "step", 50.0, 25) == "train: 25/100 steps (25%), 00:50 elapsed, ETA 02:30"
    assert plain_line("train", 100, 100, "step", 200.0, 100, final=True) == "train: 100/100 steps (100%) in 03:20"


def test_a_resumed_runs_eta_counts_only_the_steps_done_since_it_resumed():
    clock, out = Clock(), io.StringIO()
    progress = Progress(100, "train", "step", initial=50, every=10, stream=out, clock=clock)
    for _ in range(10):
        clock.now += 2.0  # 2 s a step: 40 steps left take 80 s, whatever the first 50 took
        progress.update(1)
    assert out.getvalue().splitlines()[-1] == "train: 60/100 steps (60%), 00:20 elapsed, ETA 01:20"


def test_off_a_terminal_it_prints_a_plain_line_at_most_every_interval_and_one_at_the_end():
    clock, out = Clock(), io.StringIO()
    elapsed_after = [0.0]  # seconds since the start when n units are done
    with Progress(500, "generating", "problem", every=30, stream=out, clock=clock) as progress:
        for step in range(500):
            clock.now += 0.5 if step % 7 else 3.1  # uneven work
            elapsed_after.append(clock.now - 1000.0)
            progress.update(1)
    lines = out.getvalue().splitlines()
    matches = [PLAIN.match(line) for line in lines]
    assert all(matches), lines
    assert "\r" not in out.getvalue()
    *middle, last = matches
    elapsed = [seconds(m["elapsed"]) for m in middle]
    assert len(middle) >= 10
    assert all(b - a >= 30 for a, b in zip([0] + elapsed, elapsed)), elapsed
    assert all(b - a <= 34 for a, b in zip([0] + elapsed, elapsed)), "one per interval, not fewer"
    assert (last["position"], last["total"], last["pct"]) == ("500", "500", "100") and last["took"]
    assert seconds(last["took"]) == round(clock.now - 1000.0)
    for m in middle:  # each ETA is the rest at the average rate so far
        done = int(m["position"])
        assert seconds(m["eta"]) == round(elapsed_after[done] / done * (500 - done))


def test_a_short_run_prints_only_its_final_line_and_closing_twice_prints_it_once():
    clock, out = Clock(), io.StringIO()
    progress = Progress(4, "train", "step", every=30, stream=out, clock=clock)
    for _ in range(3):
        clock.now += 1.0
        progress.update(1)
    progress.close()
    progress.close()
    assert out.getvalue() == "train: 3/4 steps (75%) in 00:03\n"  # stopped early: it says where


def test_on_a_terminal_it_is_a_bar_with_rate_and_eta():
    out = Terminal()
    with Progress(10, "train", "step", stream=out) as progress:
        for _ in range(10):
            progress.update(1)
    text = out.getvalue()
    assert "\r" in text and "train" in text and "10/10" in text
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", text), text  # tqdm's [elapsed<remaining]
    assert not PLAIN.search(text.splitlines()[-1])


# ---------------------------------------------------------------- the search's table

def trial(i: int, params: dict, status: str = "finished", best: float | None = None, epoch: float = 4.0) -> dict:
    loss = 3.0 + i / 100 if best is None else best
    return {"id": f"{i:08x}_{i:05d}", "params": params, "epoch": epoch, "latest": loss, "best": loss,
            "status": status}


def test_the_table_fits_100_columns_and_shows_every_param_when_short_names_make_them_fit():
    spec = load_spec(TINY)
    trials = [trial(1, {"training.lr": 0.000164, "training.gradient_accumulation_steps": 2,
                        "training.optimizer": "adamw"}, "stopped at rung", epoch=1.0),
              trial(2, {"training.lr": 0.0266, "training.gradient_accumulation_steps": 1,
                        "training.optimizer": "sgd"}, "running", epoch=2.5)]
    metric, *lines = table(spec, trials).splitlines()
    assert max(map(len, lines)) <= WIDTH
    assert metric.strip() == "eval_loss" and lines[0].index("latest") < metric.index("eval_loss") + 9 and \
        metric.index("eval_loss") < lines[0].index("best"), "the metric's name spans its latest and best columns"
    assert re.search(r" optim\w*=adamw ", lines[1]) and re.search(r" optim\w*=sgd ", lines[2])  # not cut off
    assert "lr=0.000164" in lines[1] and re.search(r"gradi\w*_accu\w*_steps=2", lines[1])
    assert "1.00/4" in lines[1] and "stopped at rung" in lines[1] and "2.50/4" in lines[2]
    alone = table(spec, trials[1:]).splitlines()[2]  # a refresh with other trials: the same column shape
    assert alone.split()[2].split("=")[0] == lines[2].split()[2].split("=")[0] and alone == lines[2]


def test_every_param_name_is_shortened_by_the_same_rule_each_word_to_the_same_length():
    spec = load_spec(TINY)
    header, row = table(spec, [trial(1, {"training.lr": 0.000164, "training.gradient_accumulation_steps": 2,
                                         "training.optimizer": "adamw"})]).splitlines()[1:]
    names = [cell.split("=")[0] for cell in row.split()[1:4]]
    cut = len(names[2])  # "optimizer" is one word: its length is the rule's word length
    assert names == [short_name(key, cut) for key in spec.search.space]
    assert names[1] == "_".join(word[:cut] for word in ("gradient", "accumulation", "steps"))


def test_the_table_fits_100_columns_with_many_long_params_and_a_hundred_trials():
    space = {"training.gradient_accumulation_steps": {"choice": [1, 2, 4, 8]},
             "training.early_stopping_patience": {"choice": [1, 2, 3]},
             "training.warmup_ratio": {"uniform": [0.0, 0.2]},
             "training.lr_schedule": {"choice": ["constant", "linear", "cosine"]},
             "training.weight_decay": {"loguniform": [1e-5, 1e-1]},
             "data.max_tokens_per_batch": {"choice": [1024, 2048]},
             "training.optimizer": {"choice": ["sgd", "adamw"]}}
    spec = spec_from_dict({"model": {"name": "random:tiny"}, "training": {"epochs": 10},
                           "search": {"num_samples": 100, "space": space}})
    params = {"training.gradient_accumulation_steps": 8, "training.early_stopping_patience": 3,
              "training.warmup_ratio": 0.123456, "training.lr_schedule": "constant",
              "training.weight_decay": 0.000123456, "data.max_tokens_per_batch": 2048,
              "training.optimizer": "adamw"}
    trials = [trial(i, params, "running" if i % 25 == 0 else "stopped at rung" if i % 3 else "finished",
                    best=float("nan") if i == 7 else None, epoch=i % 10 + 0.25)
              for i in range(100)]
    trials[50]["status"] = "errored"
    lines = table(spec, trials).splitlines()[1:]  # after the metric's name
    assert max(map(len, lines)) <= WIDTH, max(lines, key=len)
    assert len(lines) == 1 + MAX_ROWS + 1  # header, the rows shown, the count of the rest
    shown = [line.split()[0] for line in lines[1:-1]]
    running = [t["id"] for t in trials if t["status"] == "running"]
    assert shown[:len(running)] == running  # what is moving first
    finished = sorted((t for t in trials if t["status"] != "running" and t["best"] == t["best"]),
                      key=lambda t: t["best"])
    assert shown[len(running):] == [t["id"] for t in finished[:MAX_ROWS - len(running)]]  # then the best
    hidden = {t["id"] for t in trials} - set(shown)
    counts = dict((status, int(n)) for n, status in re.findall(r"(\d+) ([A-Za-z ]+?)(?:,|$)", lines[-1]))
    assert lines[-1].startswith(f"... {len(hidden)} more: ") and sum(counts.values()) == len(hidden)
    assert counts["errored"] == 1
    assert all(line.split()[1].startswith("gra") for line in lines[1:-1])


# ---------------------------------------------------------------- the long runs

def test_train_off_a_terminal_prints_plain_progress_lines_and_keeps_its_metrics_on_stdout(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tune_llama.train", str(TINY), "--output", str(tmp_path / "run"),
                           "--set", "training.epochs=1", "--set", "data.synthetic_size=32", "--set", "data.val_size=8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    progress = [line for line in proc.stderr.splitlines() if line.startswith("train: ")]
    assert len(progress) == 1 and re.fullmatch(r"train: (\d+)/\1 steps \(100%\) in \d\d:\d\d", progress[0]), progress
    assert "\r" not in proc.stderr
    assert re.search(r"^report=1 .*eval_loss=", proc.stdout, re.M), proc.stdout[:2000]


def test_evaluate_off_a_terminal_prints_a_plain_line_for_its_generation(capsys):
    import torch
    from tune_llama.evaluate import load, score

    loaded = load("random:tiny", torch.device("cpu"))
    problems = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"},
                {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
                {"question": "What is 4+4?", "answer": "4+4=8\n#### 8"}]
    score(loaded.model, loaded.tokenizer, problems, loaded.prompt_template, batch_size=2, max_new_tokens=4)
    err = capsys.readouterr().err
    assert re.search(r"^generating: 3/3 problems \(100%\) in \d\d:\d\d$", err, re.M), err
    assert "\r" not in err


def test_train_evaluate_and_progress_import_without_ray():
    # The GPU image has no Ray: a single run and an evaluation must not need it.
    code = ("import sys, tune_llama.progress_bar, tune_llama.live, tune_llama.train, tune_llama.evaluate; "
            "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------- between reports: the side channel

def test_between_reports_a_trial_writes_its_step_within_the_epoch_and_real_rates_every_log_every_steps(tmp_path):
    from tune_llama.loop import fit, setup
    from tune_llama.live import StepFile, read_live
    ticks = iter(range(10_000))
    path = tmp_path / ".live" / "trial.json"
    seen = []

    class Watch(StepFile):  # the file as the table would read it after each step
        def __call__(self, run):
            super().__call__(run)
            seen.append((run.step, run.tokens_seen, read_live(path)))

    run = setup(load_spec(TINY, ["training.epochs=2", "data.synthetic_size=40", "data.val_size=8",
                                 "training.eval_every=1", "training.log_every=2"]))
    fit(run, on_step=Watch(path, every=2, clock=lambda: float(next(ticks))))
    written = {live["step"]: live for _, _, live in seen}
    assert sorted(written) == [1, *range(2, run.total_steps + 1, 2)], "after the first step, every log_every, reports"
    per_epoch = run.steps_per_epoch
    for step, live in written.items():
        assert live["epoch"] == (step - 1) // per_epoch + 1 and live["steps_per_epoch"] == per_epoch
        assert live["step_in_epoch"] == (step - 1) % per_epoch + 1
        assert live["next_report_step"] == min(s for s in run.report_at if s >= step)
    # One clock tick per step: 1 s a step, and tok/s the real tokens of the steps since the last write; the
    # step after a report (validation, checkpoint) is left out of the rates.
    assert per_epoch == 4 and run.report_at == [4, 8]
    tokens = {step: t for step, t, _ in seen}
    assert all(written[step]["s_per_step"] == 1.0 for step in (2, 4, 6, 8))
    assert written[4]["tokens_per_s"] == pytest.approx((tokens[4] - tokens[2]) / 2)
    assert written[6]["tokens_per_s"] == pytest.approx(tokens[6] - tokens[5]), "the step after a report is left out"


def test_the_live_line_says_step_rate_time_since_the_report_and_eta():
    from tune_llama.live import live_line
    live = {"epoch": 2, "step_in_epoch": 37, "steps_per_epoch": 120, "step": 157, "next_report_step": 180,
            "tokens_per_s": 151.6, "s_per_step": 2.0, "time": 1000.0}
    assert live_line(live, 42.0, now=1006.0) == ("epoch 2, step 37/120, 152 tok/s, last report 00:42 ago, "
                                                 "next report in ~00:40")
    assert live_line(None, None, now=0.0) == "starting: loading the model and data"
    assert live_line(None, None, now=0.0, starting_s=45.0) == "starting: loading the model and data, 00:45 so far"
    assert live_line(None, 67.0, now=0.0, starting_s=3.0) == ("starting: loading the model and data, 00:03 so far, "
                                                              "last report 01:07 ago"), "a trial going on after a pause"
    at_report = {**live, "step": 180, "report_after": 200}
    assert live_line(at_report, 42.0, now=1006.0, reported_step=160).endswith("ago, validating for the next report")
    assert live_line(at_report, 1.0, now=1006.0, reported_step=180).endswith("1 ago, next report in ~00:34"), \
        "once that report is in, the next one is due"


def test_the_table_shows_a_running_trials_place_between_reports_under_its_row_in_100_columns():
    spec = load_spec(TINY)
    rows = [trial(1, {"training.lr": 0.000164, "training.gradient_accumulation_steps": 2,
                      "training.optimizer": "adamw"}, "running", epoch=1.5)]
    detail = "epoch 2, step 37/120, 152 tok/s, last report 00:42 ago, next report in ~00:40"
    lines = table(spec, rows, {rows[0]["id"]: detail}).splitlines()
    assert lines[-1].strip() == f"└ {detail}" and max(map(len, lines)) <= WIDTH


def test_a_trial_paused_at_a_rung_shows_as_waiting_until_it_goes_on():
    from tune_llama.trial_table import TrialTable
    from tune_llama.results import RUNNING, WAITING

    class TuneTrial:  # what Tune hands a callback: a trial with an id, its config and Ray's status
        def __init__(self, trial_id, status):
            self.trial_id, self.config, self.status = trial_id, {"training.lr": 0.01}, status

    board = TrialTable(load_spec(TINY))
    trial = TuneTrial("a1", "RUNNING")
    board.on_trial_start(0, [trial], trial)
    board.on_trial_result(0, [trial], trial, {"eval_loss": 2.5, "epoch": 1.0})
    seen = []
    for status in ("RUNNING", "PAUSED", "PAUSED", "PENDING", "RUNNING"):
        trial.status = status
        board.on_step_end(0, [trial])
        seen.append(board.trials["a1"]["status"])
    assert seen == [RUNNING, WAITING, WAITING, WAITING, RUNNING]


def test_a_started_trial_without_a_first_step_says_how_long_it_has_been_loading(tmp_path):
    from tune_llama.trial_table import TrialTable

    class TuneTrial:
        trial_id, config, status = "a1", {"training.lr": 0.01}, "RUNNING"

    board = TrialTable(load_spec(TINY), live_dir=tmp_path)  # no step file yet: the trial has taken no step
    board.on_trial_start(0, [TuneTrial], TuneTrial)
    assert re.fullmatch(r"starting: loading the model and data, 00:0\d so far", board.details()["a1"])


def test_a_search_folder_calls_a_paused_trial_waiting_while_the_search_runs_and_interrupted_after():
    from tune_llama.results import INTERRUPTED, WAITING, Trial
    paused = Trial("a1", None, {}, rows=[{"epoch": 1.0, "eval_loss": 2.5}], ray_status="PAUSED")
    assert paused.status(4, driver_alive=True) == WAITING
    assert paused.status(4, driver_alive=False) == INTERRUPTED


def test_before_the_first_trial_starts_the_table_says_what_it_waits_for_once_per_change(capsys):
    from tune_llama.trial_table import TrialTable

    class Pending:  # what Tune hands a callback: trials with an id and a status
        def __init__(self, status):
            self.trial_id, self.status = f"t{id(self)}", status

    board = TrialTable(load_spec(TINY))
    for statuses in ([], ["PENDING"], ["PENDING", "PENDING"], ["PENDING", "PENDING"]):
        board.on_step_end(0, [Pending(s) for s in statuses])
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["waiting for the searcher's first trial",
                     "1 trial pending, each asking for cpu=1, gpu=0: waiting for free resources and worker processes",
                     "2 trials pending, each asking for cpu=1, gpu=0: waiting for free resources and worker processes"]
