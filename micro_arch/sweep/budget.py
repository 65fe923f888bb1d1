"""Which trials count towards n_trials, when a worker may start one, and the grid as a queue of points.

Workers on any number of machines share one study and nothing else, so every decision here reads the
study and is safe when two workers make it at once:
- a trial's number is given out by the storage, so "the trials before mine" is the same list for all;
- a trial that finds n_trials counted or running before it steps aside (`skipped: surplus`);
- a grid point is an enqueued WAITING trial, which the storage hands to one worker only (Optuna's queue);
  two workers that enqueued the same point at once (each saw it missing) leave two queued trials, and the
  later one steps aside (`skipped: duplicate`) when an earlier one with that point is queued, running, or done.
"""

from __future__ import annotations

import json
import random
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
LIVE = (TrialState.RUNNING, TrialState.WAITING)


class Ledger:
    """The study's trials, read once, and what each of them counts for."""

    def __init__(self, trials: list[FrozenTrial]):
        self.trials = trials
        # a trial whose worker died and that Optuna's retry callback queued again: the retry carries its number
        self.retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}

    def ignored(self, t: FrozenTrial) -> bool:
        """Neither counts nor holds a place: stopped by Ctrl-C, run again after its worker died, or stepped
        aside."""
        return bool(t.user_attrs.get("interrupted") or t.user_attrs.get("skipped") or t.number in self.retried)

    def counted(self, t: FrozenTrial) -> bool:
        """Finished and counting towards n_trials (a failed one too: its failure is its result)."""
        return t.state in FINISHED and not self.ignored(t)

    def live(self, t: FrozenTrial) -> bool:
        return t.state in LIVE and not self.ignored(t)

    def done(self) -> int:
        return sum(self.counted(t) for t in self.trials)

    def may_start(self, n_trials: int) -> bool:
        """A queued trial is waiting (a retry or a grid point), or there is room for a new one."""
        if any(t.state == TrialState.WAITING and not self.ignored(t) for t in self.trials):
            return True
        running = sum(t.state == TrialState.RUNNING and not self.ignored(t) for t in self.trials)
        return self.done() + running < n_trials

    def reason_to_step_aside(self, mine: FrozenTrial, n_trials: int, grid: bool) -> str | None:
        """'surplus', 'duplicate', or None when `mine` (just started) may train."""
        others = [t for t in self.trials if t.number != mine.number and not self.ignored(t)]
        before = [t for t in others if t.number < mine.number and (self.counted(t) or self.live(t))]
        if len(before) >= n_trials:
            return "surplus"
        if not grid:
            return None
        if "fixed_params" not in mine.system_attrs:  # a fresh sample while the grid queue was empty
            return "surplus"
        here = point(mine)
        if any(point(t) == here and (self.counted(t) or (self.live(t) and t.number < mine.number)) for t in others):
            return "duplicate"
        return None


    def note(self, t: FrozenTrial) -> str:
        """Why a finished trial does not count, in words ('' when it counts)."""
        if t.user_attrs.get("interrupted"):
            return "stopped, not counted"
        if t.number in self.retried:
            return "its worker died; run again"
        if t.user_attrs.get("skipped"):
            return f"stepped aside ({t.user_attrs['skipped']})"
        return ""


def done(trials: list[FrozenTrial]) -> int:
    return Ledger(trials).done()


def point(t: FrozenTrial) -> str:
    params = t.system_attrs.get("fixed_params", t.params)
    return json.dumps(params, sort_keys=True)


def enqueue_grid(study: optuna.Study, trials: list[FrozenTrial], grid: dict[str, list], n_trials: int,
                 seed: int) -> int:
    """Queue the grid points that no counted or live trial holds, as many as n_trials leaves room for, in an
    order shuffled by the sweep's seed (so n_trials below the grid's size covers it evenly). Returns how many."""
    ledger = Ledger(trials)
    held = {point(t) for t in trials if ledger.counted(t) or ledger.live(t)}
    room = n_trials - sum(ledger.counted(t) or ledger.live(t) for t in trials)
    if room <= 0:
        return 0
    names = list(grid)
    points = [dict(zip(names, values)) for values in _product(grid.values())]
    random.Random(seed).shuffle(points)
    queued = 0
    for params in points:
        if queued == room:
            break
        if json.dumps(params, sort_keys=True) not in held:
            study.enqueue_trial(params, user_attrs={"queued_at": time.time()})
            queued += 1
    return queued


def _product(lists):
    import itertools

    return itertools.product(*lists)
