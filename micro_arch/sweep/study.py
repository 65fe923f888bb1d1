"""`micro-arch sweep sweeps/<name>.yaml`: an Optuna study over config values, memory-checked, resumable,
run by any number of workers on any number of machines.

The pieces: config.py (the sweep file and its checks), storage.py (where the study lives: SQLite, a
journal file, PostgreSQL or MySQL, each with Optuna's heartbeat), objective.py (one trial), budget.py (what
counts towards n_trials, the grid as a queue), worker.py (one worker's loop), pool.py (--workers N on this
machine, and the progress table), full.py (the best configurations trained in full), report.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import optuna
from rich.console import Console

from micro_arch.sweep import budget
from micro_arch.sweep.config import SweepConfig, load_sweep
from micro_arch.sweep.objective import sweep_dir
from micro_arch.sweep.storage import default_url, describe
from micro_arch.sweep.worker import fail_dead_local_trials, load_study, run_worker

console = Console()
__all__ = ["load_sweep", "open_study", "run_sweep", "sweep_dir"]


def open_study(sweep: SweepConfig, runs_root: str | Path, storage: str | None = None) -> optuna.Study:
    """The sweep's study (created on first use); trials left RUNNING by a dead worker of this machine are
    failed and queued again at once."""
    folder = sweep_dir(sweep, runs_root)
    if storage is None or storage == default_url(folder):  # another storage: no folder until it opens
        folder.mkdir(parents=True, exist_ok=True)
    study = load_study(sweep, storage or default_url(folder))
    fail_dead_local_trials(study, 3 * sweep.heartbeat_s)
    return study


def run_sweep(path, overrides=None, n_trials: int | None = None, runs_root: str | Path = "runs",
              full_training: bool = True, workers: int | None = None, storage: str | None = None,
              rendezvous: list[str] | None = None) -> optuna.Study:
    """Run (or join, or resume) the sweep in `path` until n_trials trials count, with `workers` processes on
    this machine (default: one per visible GPU, 1 on a CPU); then train the best top_k in full and report."""
    from micro_arch.sweep.full import train_best
    from micro_arch.sweep.pool import default_workers, run_pool
    from micro_arch.sweep.report import write_report

    say = lambda text: console.print(text, highlight=False)  # noqa: E731
    sweep = load_sweep(path, overrides, n_trials=n_trials, say=say)
    workers = workers or default_workers()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = sweep_dir(sweep, runs_root)
    url = storage or default_url(folder)
    study = open_study(sweep, runs_root, storage)
    done = budget.done(study.get_trials(deepcopy=False))
    console.print(f"[bold]sweep {sweep.name}[/]: {sweep.experiment}, {len(sweep.search_space)} parameters, "
                  f"{done} of {sweep.n_trials} trials done, {workers} worker(s) here -> {folder} "
                  f"(study: {describe(url)})", soft_wrap=True)
    if done < sweep.n_trials:
        try:
            if workers == 1:
                run_worker(sweep, url, runs_root)
            else:
                job = {"path": str(path), "overrides": list(overrides or []), "n_trials": sweep.n_trials,
                       "storage": url, "runs_root": str(runs_root)}
                run_pool(job, workers, study, folder, console)
        except KeyboardInterrupt:
            again = ["micro-arch", "sweep", str(path), *(["--set", *overrides] if overrides else []),
                     *(["--trials", str(n_trials)] if n_trials is not None else []),
                     *(["--storage", storage] if storage else [])]
            console.print(f"sweep {sweep.name} stopped; the interrupted trial is not counted. To continue the "
                          f"study (not the trial's run), start the sweep again:\n  {shlex.join(again)}\n"
                          "(with any number of --workers, here or on other machines: the study is the same)",
                          soft_wrap=True, highlight=False)
            raise
    finals = train_best(study, sweep, runs_root, console, rendezvous) if full_training and sweep.top_k else []
    write_report(study, folder, sweep, finals, console=console)
    return study
