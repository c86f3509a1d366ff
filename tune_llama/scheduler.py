"""The default scheduler, ``search.scheduler: halving``: successive halving whose rungs wait for company.

ASHA promotes a trial past a rung when it beats the top 1/reduction_factor of the results recorded *so far*
there, so the first trials at each rung meet no competition and run to ``max_t`` (9 of 24 on ``tiny.yaml``,
where synchronous halving lets about 1.5 through). ``HalvingScheduler`` has rungs as ASHA has
(``budget.halving_rungs``: by default the two measured to rank configs as full length does, else
``grace_period`` x ``reduction_factor``^k epochs below ``max_t``) but judges a trial only once its rung holds
at least its reduction factor's number of results: until then the trial is paused (from the checkpoint its
report carries) and frees its slot for the next trial. Once the rung is full enough, each waiting trial, and
each later arrival, continues if it is among the best 1/reduction_factor recorded there, else it stops. When
no trial is left that could fill a rung (every trial of ``num_samples`` created, none running or pending), the
best of those waiting there goes on and the rest stop, so the search always ends.

With a budget plan (``search.budget``, ``tune_llama.budget``) the rungs are the plan's and every rung is
synchronous: it is judged once every trial that can reach it has, and exactly the plan's number goes on, so
the bracket spends what the plan says. The one trial that passes the last rung is the winner: it trains to
``training.epochs`` and on past it (its trainable runs to the plan's ``winner_epochs``) until a report without
a better value has come ``patience`` times in a row, or the search has spent its budget.

Paused trials must not hold the concurrency limit, or two waiting trials would block the trials that could
judge them: ``WaitingLimiter`` is Ray's ``ConcurrencyLimiter`` that does not count them. The scheduler's
records live in ``scheduler.json`` in the search folder (Tune does not save a scheduler's state), so a resumed
or extended search judges against every result it had; the folder is the one the trials live in now
(``Trial.remote_experiment_path``), so a moved or copied search keeps its records with it. Public Ray APIs
only, except stopping a paused trial (``ray_private.stop_trial``), as Ray's own HyperBand does. A paused
trial's process is stopped: ``callbacks.ReleaseWorkers`` frees a multi-worker trial's workers meanwhile, and
``callbacks.result_loggers`` keep the rows it wrote when it goes on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter

from tune_llama.budget import Plan
from tune_llama.ray_private import stop_trial
from tune_llama.results import load_search_spec, sort_key

STATE_FILE = "scheduler.json"
ENDED = (Trial.TERMINATED, Trial.ERROR)


class WaitingLimiter(ConcurrencyLimiter):
    """At most ``max_concurrent`` trials that are not paused at a rung (``on_pause``/``on_unpause``)."""

    def __init__(self, searcher, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.waiting: set[str] = set()  # part of get_state, so a resume keeps it

    def suggest(self, trial_id: str) -> Optional[dict]:
        if len(self.live_trials - self.waiting) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if isinstance(suggestion, dict):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion

    def on_pause(self, trial_id: str):  # not forwarded: a plain Searcher (OptunaSearch) has no such hook
        self.waiting.add(trial_id)

    def on_unpause(self, trial_id: str):
        self.waiting.discard(trial_id)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        self.waiting.discard(trial_id)
        super().on_trial_complete(trial_id, result=result, error=error)


class HalvingScheduler(FIFOScheduler):
    _supports_buffered_results = False  # a trial must stop at its rung, not several reports past it

    def __init__(self, search_dir: Path, limiter: WaitingLimiter, *, time_attr: str, max_t: float,
                 rungs: list[tuple[float, int]], plan: Optional[Plan] = None, patience: int = 4):
        """``rungs``: (epoch, reduction factor) of each rung, or with a ``plan``, the plan's."""
        super().__init__()
        self.search_dir, self.limiter, self.time_attr, self.max_t = str(search_dir), limiter, time_attr, max_t
        self._metric: Optional[str] = None
        self._mode = "min"
        self.plan = plan
        self.milestones = list(plan.rungs) if plan else [epoch for epoch, _ in rungs]
        self.factors = [0 for _ in self.milestones] if plan else [factor for _, factor in rungs]
        self.patience = patience
        self.state: Optional[dict[str, Any]] = None  # loaded from STATE_FILE on first use (after a restore too)
        self.total: Optional[int] = None

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        """Metric and mode come from the ``TuneConfig``, as for Ray's schedulers."""
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    # ------------------------------------------------------------ state
    def _follow(self, trial: Optional[Trial]) -> None:
        """Keep the records in the folder the trials live in now (a resumed copy's, not the original's)."""
        folder = getattr(trial, "remote_experiment_path", None) if trial is not None else None
        if folder and str(folder) != self.search_dir:
            self.search_dir, self.state = str(folder), None

    def _state(self) -> dict[str, Any]:
        if self.state is None:
            path = Path(self.search_dir, STATE_FILE)
            self.state = json.loads(path.read_text()) if path.is_file() else {
                "recorded": [{} for _ in self.milestones], "waiting": {}, "promoted": [], "stopped": []}
            for key in ("best", "since_best", "epochs", "step"):  # records written before budgets lack them
                self.state.setdefault(key, {})
            # num_samples from the search folder's spec: ``--more`` raises it there
            self.total = load_search_spec(Path(self.search_dir)).search.num_samples
        return self.state

    def _save(self) -> None:
        path = Path(self.search_dir, STATE_FILE)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, path)  # a kill mid-write leaves the previous state, never half a file

    def spent_epochs(self) -> float:
        """Trial-epochs reported so far: each trial's furthest epoch, summed."""
        return sum(self._state()["epochs"].values())

    # ------------------------------------------------------------ decisions
    def _value(self, result: dict) -> float:
        value = result.get(self._metric)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf * (
            1 if self._mode == "min" else -1)

    def _passes(self, rung: int, trial_id: str) -> bool:
        """Among the best max(1, n // reduction_factor) of the n results recorded at ``rung``."""
        recorded = self._state()["recorded"][rung]
        keep = max(1, len(recorded) // self.factors[rung])
        ranked = sorted(recorded, key=lambda t: (sort_key(recorded[t], self._mode), t))
        return trial_id in ranked[:keep]

    def _settle(self, rung: int, best_only: bool = False) -> None:
        """Judge the trials waiting at ``rung``: promoted ones run again (``choose_trial_to_run``), the rest stop;
        ``best_only``: just the best of them goes on; with a plan, the plan's number of them."""
        state = self._state()
        waiting = [t for t, at in state["waiting"].items() if at == rung]
        recorded = state["recorded"][rung]
        ranked = sorted(waiting, key=lambda t: (sort_key(recorded.get(t, math.inf), self._mode), t))
        if self.plan:
            going_on = set(ranked[:self.plan.keep[rung]])
        elif best_only:
            going_on = set(ranked[:1])
        else:
            going_on = {t for t in waiting if self._passes(rung, t)}
        for trial_id in waiting:
            del state["waiting"][trial_id]
            if trial_id in going_on:
                state["promoted"].append(trial_id)
                self.limiter.on_unpause(trial_id)  # it holds a slot again
            else:
                state["stopped"].append(trial_id)  # choose_trial_to_run stops it once its pause has saved

    def _everyone_arrived(self, trials: list[Trial], rung: int) -> bool:
        """Plan rungs are synchronous: every trial created, and none alive that has not reported at ``rung``."""
        state = self._state()
        if len(trials) < (self.total or 0):
            return False
        return all(t.trial_id in state["recorded"][rung] or t.trial_id in state["stopped"] or t.status in ENDED
                   for t in trials)

    def _settle_arrived(self, trials: list[Trial]) -> bool:
        """With a plan: judge each rung whose trials have all arrived; whether any was judged."""
        state, judged = self._state(), False
        for rung in sorted(set(state["waiting"].values())):
            if self._everyone_arrived(trials, rung):
                self._settle(rung)
                judged = True
        return judged

    def _record_progress(self, trial_id: str, t: float, value: float) -> None:
        state = self._state()
        steps = state["step"]  # the longest gap between its reports: reports need not be even
        steps[trial_id] = max(steps.get(trial_id, 0.0), t - state["epochs"].get(trial_id, 0.0))
        state["epochs"][trial_id] = max(t, state["epochs"].get(trial_id, 0.0))
        best = state["best"].get(trial_id)
        if best is None or sort_key(value, self._mode) < sort_key(best, self._mode):
            state["best"][trial_id], state["since_best"][trial_id] = value, 0
        else:
            state["since_best"][trial_id] = state["since_best"].get(trial_id, 0) + 1

    def _winner_done(self, trial_id: str, t: float) -> bool:
        """Past ``training.epochs``, the winner goes on while it improves and the budget lasts."""
        if self.plan is None or t <= self.max_t + 1e-9:
            return False
        state = self._state()
        next_report = state["step"].get(trial_id, 0.0)  # stop before its next report could overrun the budget
        return state["since_best"].get(trial_id, 0) >= self.patience or \
            self.spent_epochs() + next_report > self.plan.budget_epochs + 1e-9

    def on_trial_result(self, controller, trial: Trial, result: dict) -> str:
        if self.time_attr not in result:
            return TrialScheduler.CONTINUE
        self._follow(trial)
        state = self._state()
        trial_id, t = trial.trial_id, result[self.time_attr]
        self._record_progress(trial_id, t, self._value(result))
        if trial_id in state["stopped"]:  # judged while its pause was saving, or before a resume restarted it
            self._save()
            return TrialScheduler.STOP
        if trial_id in state["waiting"]:  # a resume restarted it before its rung was judged: wait again
            self.limiter.on_pause(trial_id)
            self._save()
            return TrialScheduler.PAUSE
        if trial_id in state["promoted"]:
            state["promoted"].remove(trial_id)
        reached = [k for k, m in enumerate(self.milestones) if m <= t + 1e-9 and trial_id not in state["recorded"][k]]
        if not reached:
            decision = TrialScheduler.STOP if self._winner_done(trial_id, t) else TrialScheduler.CONTINUE
            if decision == TrialScheduler.STOP:
                state["stopped"].append(trial_id)
            self._save()
            return decision
        for k in reached:  # reports coarser than the rungs pass several at once, with the same value
            # its best report so far, as the winner is picked by: one spiking report does not cut a good config
            state["recorded"][k][trial_id] = state["best"][trial_id]
        rung = reached[-1]
        if self.plan:
            state["waiting"][trial_id] = rung
            self.limiter.on_pause(trial_id)
            self._settle_arrived(controller.get_trials())
            decision = TrialScheduler.PAUSE
            if trial_id in state["promoted"]:  # the last to arrive: judged at once
                state["promoted"].remove(trial_id)
                decision = TrialScheduler.CONTINUE
            elif trial_id in state["stopped"]:
                decision = TrialScheduler.STOP
        elif len(state["recorded"][rung]) < self.factors[rung]:
            state["waiting"][trial_id] = rung
            self.limiter.on_pause(trial_id)
            decision = TrialScheduler.PAUSE
        else:
            self._settle(rung)
            decision = TrialScheduler.CONTINUE if self._passes(rung, trial_id) else TrialScheduler.STOP
            if decision == TrialScheduler.STOP:
                state["stopped"].append(trial_id)
        self._save()
        return decision

    def _forget(self, trial: Trial) -> None:
        self._follow(trial)
        state = self._state()
        if state["waiting"].pop(trial.trial_id, None) is not None:
            self._save()

    def on_trial_error(self, controller, trial: Trial):
        self._forget(trial)

    def on_trial_complete(self, controller, trial: Trial, result: dict):
        self._forget(trial)

    def choose_trial_to_run(self, controller) -> Optional[Trial]:
        trials = controller.get_trials()
        self._follow(trials[0] if trials else None)
        state = self._state()
        if self.plan:
            if self._settle_arrived(trials):
                self._save()
        elif state["waiting"] and len(trials) >= (self.total or 0) and not any(
                t.status in (Trial.RUNNING, Trial.PENDING) and t.trial_id not in state["waiting"] for t in trials):
            # nobody left to fill the lowest rung that has waiting trials: judge them among themselves
            self._settle(min(state["waiting"].values()), best_only=True)
            self._save()
        for trial in trials:
            if trial.status in (Trial.PAUSED, Trial.PENDING) and trial.trial_id in state["stopped"]:
                stop_trial(controller, trial)  # a pause still saving when it was judged, or a resumed one
        for trial in trials:
            if trial.status == Trial.PAUSED and trial.trial_id in state["promoted"]:
                return trial
        for trial in trials:
            if trial.status == Trial.PENDING and trial.trial_id not in state["waiting"]:
                return trial
        return None

    def debug_string(self) -> str:
        if self.plan:
            return f"Budget plan: rungs at epochs {self.milestones} keeping {list(self.plan.keep)}."
        return f"Successive halving at epochs {self.milestones}, waiting for {self.factors} results there."
