"""After the proxy phase: the best top_k configurations train with the full budget, each once.

Each one trains in its own folder, runs/sweeps/<name>/full/<trial>/, so a sweep started again finds it:
a finished run is kept, an interrupted one (Ctrl-C, or a killed process) is resumed, never orphaned.
Where they train:
- every configuration fits one GPU and this machine has several: side by side, one per GPU, as separate
  processes (`micro-arch run` with CUDA_VISIBLE_DEVICES);
- otherwise one after the other, each with DDP over all local GPUs (torchrun), and over several machines
  when torchrun's rendezvous arguments are given (every machine runs the same sweep command with them);
- on a CPU (or one GPU): one after the other, in this process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from rich.console import Console

from micro_arch.errors import MicroArchError
from micro_arch.sweep import budget
from micro_arch.sweep.config import SweepConfig
from micro_arch.sweep.objective import budget_overrides, param_overrides, sweep_dir
from micro_arch.train.distributed import Process, run_in_slots

RESUMABLE = ("running", "interrupted")  # a run whose process was stopped; any other status is final


@dataclass
class Job:
    trial: int
    params: dict
    proxy_value: float
    overrides: list[str]
    folder: Path  # runs root of this full training
    resume: Path | None = None  # an interrupted run of it to continue
    done: Path | None = None  # a finished run of it
    memory_mb: float = 0.0
    env: dict = field(default_factory=dict)


def best_jobs(study: optuna.Study, sweep: SweepConfig, runs_root: str | Path, console: Console) -> list[Job]:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        ledger = budget.Ledger(study.trials)
        counted = [t for t in study.trials if ledger.counted(t)]
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in counted)
        failed = sum(t.state == optuna.trial.TrialState.FAIL for t in counted)
        console.print(f"[bold yellow]no trial completed[/] ({pruned} pruned, {failed} failed of {len(counted)}), so "
                      f"there is no best configuration: the full training of the best {sweep.top_k} is skipped. "
                      "Raise memory_budget_mb, lengthen trial_steps, or use pruner: none, and start the sweep "
                      "again (its trials are kept).", highlight=False)
        return []
    jobs = []
    for t in sorted(complete, key=lambda t: t.value)[: sweep.top_k]:
        overrides = sweep.set + param_overrides(t.params) + budget_overrides(sweep.full_steps, sweep.full_tokens)
        job = Job(t.number, t.params, t.value, overrides, sweep_dir(sweep, runs_root) / "full" / f"{t.number:04d}",
                  memory_mb=t.user_attrs.get("memory_estimate_mb", 0.0))
        job.done, job.resume = earlier_run(job.folder)
        jobs.append(job)
    return jobs


def earlier_run(folder: Path) -> tuple[Path | None, Path | None]:
    """(a finished run, an interrupted run with a checkpoint) in folder/<experiment>/, newest first."""
    from micro_arch import checkpoint as ckpt

    for run in sorted(folder.glob("*/*/summary.json"), reverse=True):
        status = json.loads(run.read_text()).get("status")
        if status not in RESUMABLE:
            return run.parent, None
        if ckpt.has_checkpoints(run.parent):
            return None, run.parent
    return None, None


def train_best(study: optuna.Study, sweep: SweepConfig, runs_root: str | Path, console: Console,
               rendezvous: list[str] | None = None) -> list[dict]:
    """Train the top_k completed trials with the full budget; returns what full_runs.json records."""
    jobs = best_jobs(study, sweep, runs_root, console)
    gpus = _gpu_memory_mb()
    todo = [j for j in jobs if j.done is None]
    for job in todo:
        where = f"resuming {job.resume}" if job.resume else "a new run"
        console.rule(f"[bold]full training[/]: trial {job.trial} (proxy {sweep.objective} {job.proxy_value:.4f}), "
                     f"{where}")
    if todo:
        plan = placement(todo, gpus, rendezvous)
        if plan == "side by side":
            from micro_arch.train.distributed import visible_gpus

            run_side_by_side(todo, [{"CUDA_VISIBLE_DEVICES": g} for g in visible_gpus()], sweep, console)
        elif plan == "ddp":
            for job in todo:
                _run_ddp(job, sweep, max(1, len(gpus)), rendezvous)
        else:
            for job in todo:
                _run_here(job, sweep)
    finals = [{"trial": j.trial, "params": j.params, "proxy_value": j.proxy_value,
               "run_dir": str(j.done or _newest_run(j.folder) or "")} for j in jobs]
    (sweep_dir(sweep, runs_root) / "full_runs.json").write_text(json.dumps(finals, indent=2) + "\n")
    return finals


def placement(jobs: list[Job], gpu_memory_mb: list[float], rendezvous: list[str] | None) -> str:
    """'side by side' (each fits one GPU, several GPUs), 'ddp' (over local GPUs, or nodes), or 'here'."""
    if rendezvous:
        return "ddp"
    if len(gpu_memory_mb) < 2:
        return "here"
    if all(0 < j.memory_mb <= min(gpu_memory_mb) for j in jobs):
        return "side by side"
    return "ddp"


def _cli(job: Job, sweep: SweepConfig) -> list[str]:
    args = ["run", str(sweep.experiment), "--runs-dir", str(job.folder), "--set", *job.overrides]
    return args + (["--resume", str(job.resume)] if job.resume else [])


def run_side_by_side(jobs: list[Job], slots: list[dict], sweep: SweepConfig, console: Console) -> None:
    """Each job a `micro-arch run` process with the environment of a free slot (a GPU), as many at once as
    there are slots; the output of each goes to <its folder>/full.log."""
    failed = run_in_slots([Process(f"trial {job.trial}", _cli(job, sweep), job.folder / "full.log") for job in jobs],
                          slots, console)
    if failed:
        raise MicroArchError(f"the full training of {'; '.join(failed)} failed; start the sweep again to resume it")


def _run_ddp(job: Job, sweep: SweepConfig, nproc: int, rendezvous: list[str] | None) -> None:
    from micro_arch.train.distributed import launch

    code = launch(nproc, _cli(job, sweep), rendezvous=rendezvous)
    if code in (130, -2):
        raise KeyboardInterrupt
    if code:
        raise MicroArchError(f"the full training of trial {job.trial} with {nproc} process(es) per node failed "
                             f"(exit code {code}); start the sweep again to resume it")


def _run_here(job: Job, sweep: SweepConfig) -> None:
    from micro_arch.commands.run import run_experiment

    run_experiment(sweep.experiment, job.overrides, runs_root=str(job.folder), resume=job.resume)


def _newest_run(folder: Path) -> Path | None:
    runs = sorted(folder.glob("*/*/summary.json"))
    return runs[-1].parent if runs else None


def _gpu_memory_mb() -> list[float]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory / 2**20 for i in range(torch.cuda.device_count())]
