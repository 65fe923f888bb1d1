"""One worker: pulls trials from the shared study until n_trials count, on the device it is pinned to.

Any number of workers, on any number of machines, run this loop against one storage. Each trial runs
through Optuna's own `study.optimize` (one trial per call), which records the heartbeat and fails the
trials of workers that went quiet (RetryHeartbeatStaleTrialCallback queues them again); the decisions of
budget.py keep n_trials exact and a grid point trained once.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
import warnings
import zlib
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from micro_arch.errors import MicroArchError
from micro_arch.rundir import process_alive
from micro_arch.sweep import budget
from micro_arch.sweep.config import SweepConfig, grid_points
from micro_arch.sweep.objective import Objective, console, mark_interrupted
from micro_arch.sweep.storage import open_storage

POLL_S = 1.0  # how often an idle worker looks at the study again


class SteppedAside(Exception):
    """The trial was a surplus or a duplicate; it is failed at once, marked, and not counted."""


class OutOfMemory(Exception):
    """The trial ran out of device memory despite the estimate (another process on the device, a fragmented
    allocator): failed, and queued again like the trial of a dead worker, at most max_retries times."""


def sampler(sweep: SweepConfig, seed: int):
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "grid":  # grid points come from the study's queue (budget.enqueue_grid)
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner(sweep: SweepConfig):
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=sweep.trial_steps or "auto")
    return optuna.pruners.NopPruner()


def load_study(sweep: SweepConfig, storage_url: str, seed_offset: int = 0) -> optuna.Study:
    with warnings.catch_warnings():  # the heartbeat arguments are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        storage = open_storage(storage_url, sweep.heartbeat_s, sweep.max_retries)
        study = optuna.create_study(study_name=sweep.name, storage=storage, load_if_exists=True,
                                    direction="minimize", sampler=optuna.samplers.RandomSampler(),
                                    pruner=pruner(sweep))
    # a resumed study, and each worker, gets its own sampler seed, so no two replay the same samples
    study.sampler = sampler(sweep, sweep.seed + len(study.trials) + seed_offset)
    return study


def this_host() -> str:
    return socket.gethostname()


def fail_dead_local_trials(study: optuna.Study, grace_s: float) -> None:
    """Trials RUNNING for a worker of this machine whose process is gone (killed, out of memory) are failed
    now, through the same retry callback as a stale heartbeat, instead of after the grace period. So are
    trials that name no worker at all after the grace period (left by a sweep of an earlier micro-arch,
    which had no heartbeat: they would never turn stale)."""
    storage, host, now = study._storage, this_host(), datetime.datetime.now()
    callback = stale_callback(storage)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if pid is None:
            if t.datetime_start is None or (now - t.datetime_start).total_seconds() < grace_s:
                continue
        elif t.user_attrs.get("host") != host or pid == os.getpid() or process_alive(pid):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        callback(study, storage.get_trial(t._trial_id))


def stale_callback(storage):
    """The storage's retry callback (storage.open_storage gave it one)."""
    if hasattr(storage, "get_heartbeat_stale_trial_callback"):
        return storage.get_heartbeat_stale_trial_callback()
    return storage.get_failed_trial_callback()  # Optuna before 4.9


def run_worker(sweep: SweepConfig, storage_url: str, runs_root: str | Path, name: str = "w0",
               index: int = 0) -> int:
    """Run trials until n_trials count in the study; returns how many this worker ran."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    host = this_host()
    offset = 0 if index == 0 else 1000 * index + zlib.crc32(host.encode()) % 1000
    study = load_study(sweep, storage_url, seed_offset=offset)
    objective = Objective(sweep, Path(runs_root))
    grid = grid_points(sweep) if sweep.sampler == "grid" else None
    ran, free_since, aside, oom = 0, time.time(), [False], [None]

    def claimed(trial: optuna.Trial) -> float:
        aside[0] = False
        info = {"worker": f"{host}/{name}", "host": host, "pid": os.getpid(),
                "wait_s": round(time.time() - free_since, 3)}
        for key, value in info.items():
            trial.set_user_attr(key, value)
        trials = study.get_trials(deepcopy=False)
        mine = next(t for t in trials if t.number == trial.number)
        why = budget.Ledger(trials).reason_to_step_aside(mine, sweep.n_trials, grid is not None)
        if why:
            aside[0] = True
            trial.set_user_attr("skipped", why)
            raise SteppedAside(why)
        try:
            return objective(trial)
        except KeyboardInterrupt:  # wherever Ctrl-C lands in the trial, it is not counted
            mark_interrupted(study._storage, trial._trial_id)
            raise
        except torch.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            oom[0] = trial._trial_id
            raise OutOfMemory(str(err).splitlines()[0]) from None

    with _failed_trials_logged_without_traceback():
        while True:
            fail_dead_local_trials(study, 3 * sweep.heartbeat_s)
            trials = study.get_trials(deepcopy=False)
            if budget.Ledger(trials).done() >= sweep.n_trials:
                break
            if grid is not None:
                budget.enqueue_grid(study, trials, grid, sweep.n_trials, sweep.seed + len(trials))
                trials = study.get_trials(deepcopy=False)
            if not budget.Ledger(trials).may_start(sweep.n_trials):
                time.sleep(POLL_S)  # the rest are running elsewhere; one of them may die and come back
                continue
            study.optimize(claimed, n_trials=1, catch=(MicroArchError, SteppedAside, OutOfMemory), gc_after_trial=True)
            if oom[0] is not None:
                console.print("  [yellow]out of memory despite the estimate[/]: the trial is queued again")
                stale_callback(study._storage)(study, study._storage.get_trial(oom[0]))
                oom[0] = None
            if not aside[0]:
                ran += 1
                free_since = time.time()
    return ran


@contextlib.contextmanager
def _failed_trials_logged_without_traceback():
    """Optuna logs a failed trial with its traceback; for Ctrl-C and a MicroArchError (whose message says what
    was wrong) the one line of the error is the whole story, and a trial that stepped aside is no failure."""
    log = logging.getLogger("optuna.study._optimize")

    def keep(record: logging.LogRecord) -> bool:
        if record.exc_info and issubclass(record.exc_info[0], SteppedAside):
            return False
        if "SteppedAside" in record.getMessage() or record.getMessage().endswith("failed with value None."):
            return False  # the second line Optuna logs for every failed trial says nothing the first did not
        if record.exc_info and issubclass(record.exc_info[0], (KeyboardInterrupt, MicroArchError)):
            record.exc_info = None
        return True

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


__all__ = ["console", "grid_points", "load_study", "run_worker"]
