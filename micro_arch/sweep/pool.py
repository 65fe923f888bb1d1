"""`--workers N`: N worker processes on this machine, each pinned to one device, all on one study, and a
table of what each is doing (read from the study, so it shows the workers of other machines too).

A GPU worker sees one GPU (CUDA_VISIBLE_DEVICES, round robin when there are more workers than GPUs); CPU
workers split the cores (OMP_NUM_THREADS). Workers that share a device split its memory budget. Each
worker's own output goes to runs/sweeps/<name>/workers/<host>-<name>.log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from rich.console import Console
from rich.live import Live
from rich.table import Table

from micro_arch.errors import MicroArchError
from micro_arch.sweep import budget
from micro_arch.sweep.objective import DEVICE_SHARE_ENV
from micro_arch.sweep.worker import this_host
from micro_arch.train.distributed import visible_gpus

REFRESH_S = 1.0


@dataclass
class Slot:
    name: str
    env: dict[str, str]
    device: str


def default_workers() -> int:
    return max(1, len(visible_gpus()))


def worker_slots(n: int) -> list[Slot]:
    """Where each of n workers runs: one GPU each (shared round robin when n exceeds the GPUs), or a share
    of the CPU's cores."""
    gpus = visible_gpus()
    if gpus:
        users = {g: sum(gpus[i % len(gpus)] == g for i in range(n)) for g in gpus}
        return [Slot(f"w{i}", {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)],
                               DEVICE_SHARE_ENV: str(users[gpus[i % len(gpus)]])}, f"cuda:{gpus[i % len(gpus)]}")
                for i in range(n)]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    return [Slot(f"w{i}", {"OMP_NUM_THREADS": threads, DEVICE_SHARE_ENV: str(n)}, f"cpu x{threads}")
            for i in range(n)]


def run_pool(job: dict, n: int, study: optuna.Study, folder: Path, console: Console) -> None:
    """Start n worker processes for `job` (the arguments of run_worker, as JSON) and wait for them, showing
    the study's progress. Ctrl-C is passed to every worker once (each stops its trial and marks it); then
    KeyboardInterrupt is raised here."""
    logs = folder / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    host = this_host()
    procs = []
    for index, slot in enumerate(worker_slots(n)):
        log = logs / f"{host}-{slot.name}.log"
        args = json.dumps({**job, "name": slot.name, "index": index})
        env = {**os.environ, **slot.env}
        with open(log, "ab") as out:  # started in their own session: a terminal's Ctrl-C reaches us alone
            procs.append((slot, log, subprocess.Popen([sys.executable, "-m", "micro_arch.sweep", args], env=env,
                                                      stdout=out, stderr=subprocess.STDOUT,
                                                      start_new_session=True)))
        console.print(f"  worker {host}/{slot.name} on {slot.device}, pid {procs[-1][2].pid}, log {log}",
                      highlight=False)
    try:
        _watch(procs, study, job["n_trials"], console)
    except KeyboardInterrupt:
        for _, _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _, _, p in procs:
            _wait_through_ctrl_c(p)
        raise
    failed = [(slot, log, p.returncode) for slot, log, p in procs if p.returncode]
    if any(code in (130, -signal.SIGINT) for _, _, code in failed):
        raise KeyboardInterrupt
    for slot, log, code in failed:
        console.print(f"[yellow]worker {host}/{slot.name} exited with code {code}[/]; its trial, if any, was "
                      f"failed and queued again for the others; log: {log}", highlight=False)
    if budget.done(study.get_trials(deepcopy=False)) < job["n_trials"]:
        raise MicroArchError(f"every worker stopped before {job['n_trials']} trials counted; see the logs in {logs}")


def _wait_through_ctrl_c(p: subprocess.Popen) -> None:
    while True:
        try:
            p.wait()
            return
        except KeyboardInterrupt:  # a second Ctrl-C: the workers are saving; wait for them all the same
            continue


def _watch(procs, study: optuna.Study, n_trials: int, console: Console) -> None:
    seen: set[int] = set()
    try:
        with Live(progress_table(study, n_trials), console=console, refresh_per_second=1, transient=False) as live:
            while any(p.poll() is None for _, _, p in procs):
                time.sleep(REFRESH_S)
                trials = study.get_trials(deepcopy=False)
                for t in trials:
                    if t.state.is_finished() and t.number not in seen:
                        seen.add(t.number)
                        if not t.user_attrs.get("skipped"):
                            live.console.print(finished_line(t, budget.Ledger(trials)), highlight=False)
                live.update(progress_table(study, n_trials, trials))
    finally:
        console.print()  # in a file or a pipe the table's last line ends here, not where the next output begins


def finished_line(t: optuna.trial.FrozenTrial, ledger: budget.Ledger) -> str:
    value = "" if t.value is None else f" {t.value:.4f}"
    note = f" ({ledger.note(t)})" if ledger.note(t) else ""
    return (f"trial {t.number} {t.state.name.lower()}{value}{note} on {t.user_attrs.get('worker', '?')}, "
            f"waited {t.user_attrs.get('wait_s', 0):.1f} s")


def progress_table(study: optuna.Study, n_trials: int, trials=None) -> Table:
    """One row per worker that has run a trial of the study, on any machine."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    ledger = budget.Ledger(trials)
    table = Table(title=f"{study.study_name}: {ledger.done()} of {n_trials} trials counted")
    for col in ("worker", "trials", "now", "step", "value", "params"):
        table.add_column(col)
    workers: dict[str, list] = {}
    for t in trials:
        if "worker" in t.user_attrs and not t.user_attrs.get("skipped"):
            workers.setdefault(t.user_attrs["worker"], []).append(t)
    for name, ts in sorted(workers.items()):
        running = [t for t in ts if t.state == optuna.trial.TrialState.RUNNING]
        now = running[-1] if running else None
        step = max(now.intermediate_values) if now and now.intermediate_values else None
        table.add_row(name, str(sum(ledger.counted(t) for t in ts)),
                      f"trial {now.number}" if now else "idle", "" if step is None else str(step),
                      "" if step is None else f"{now.intermediate_values[step]:.4f}",
                      ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in now.params.items()) if now else "")
    return table


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
