"""One trial: sample values, check the combination and the memory on this worker's own device (pruned
before training if either fails), train the proxy budget and return its held-out loss (or bits per byte)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import optuna
import torch
from rich.console import Console
from rich.markup import escape

from micro_arch.config import ExperimentConfig
from micro_arch.errors import MicroArchError
from micro_arch.sweep.config import ParamRange, SweepConfig

console = Console()
DEVICE_SHARE_ENV = "MICRO_ARCH_SWEEP_DEVICE_SHARE"  # how many workers share this worker's device


def memory_budget_mb(device: torch.device) -> float:
    """This worker's part of its device's memory: the GPU's (or the host's RAM), divided among the workers
    that share the device."""
    share = max(1, int(os.environ.get(DEVICE_SHARE_ENV, "1")))
    return device_memory_mb(device) / share


def device_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    raise MicroArchError("cannot tell this machine's memory; set memory_budget_mb in the sweep file")


def suggest(trial: optuna.Trial, key: str, r: ParamRange):
    if r.type == "categorical":
        return trial.suggest_categorical(key, r.choices)
    if r.type == "int":
        return trial.suggest_int(key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
    return trial.suggest_float(key, r.low, r.high, step=r.step, log=r.log)


def param_overrides(params: dict) -> list[str]:
    """Sampled values as `--set` overrides (JSON is valid YAML, so strings and lists survive)."""
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def budget_overrides(steps: int | None, tokens: int | None) -> list[str]:
    # an experiment's own budget_tokens/budget_flops would outrank the sweep's budget: cleared
    other = ["train.budget_tokens=null", "train.budget_flops=null"]
    if steps is not None:
        return [f"train.max_steps={steps}", "train.max_tokens=null", *other]
    if tokens is not None:
        return [f"train.max_tokens={tokens}", *other]
    return []


def sweep_dir(sweep: SweepConfig, runs_root: str | Path) -> Path:
    return Path(runs_root) / "sweeps" / sweep.name


def mark_interrupted(storage, trial_id: int) -> None:
    """Not counted towards n_trials, and its point (of a grid) free to be queued again."""
    storage.set_trial_user_attr(trial_id, "interrupted", True)


class Objective:
    """One trial: sample, check memory (prune before training if over budget), train the proxy budget."""

    def __init__(self, sweep: SweepConfig, runs_root: Path):
        self.sweep, self.runs_root = sweep, Path(runs_root)
        self.trials_dir = sweep_dir(sweep, runs_root) / "trials"

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._trial(trial)
        except KeyboardInterrupt:  # Ctrl-C: not a finished trial, so the next start runs one in its place
            mark_interrupted(trial.study._storage, trial._trial_id)
            raise

    def _trial(self, trial: optuna.Trial) -> float:
        from micro_arch.commands.run import run_experiment
        from micro_arch.device import resolve_device
        from micro_arch.experiment import load_experiment, with_vocab
        from micro_arch.memory import estimate_memory

        s = self.sweep
        params = {key: suggest(trial, key, r) for key, r in s.search_space.items()}
        overrides = s.set + param_overrides(params) + budget_overrides(s.trial_steps, s.trial_tokens)
        console.rule(f"[bold]{s.name}[/] trial {trial.number}: "
                     + ", ".join(f"{k}={v}" for k, v in params.items()))
        try:
            cfg = with_vocab(load_experiment(s.experiment, overrides))
        except MicroArchError as err:  # each value is valid with some other values, but not with these
            trial.set_user_attr("invalid", str(err))
            console.print(f"  [yellow]pruned before training[/]: this combination is not a valid config: "
                          f"{escape(str(err))}")
            raise optuna.TrialPruned(f"not a valid config: {err}") from None
        device = resolve_device(cfg.train.device)
        budget = s.memory_budget_mb if s.memory_budget_mb is not None else memory_budget_mb(device)
        est = estimate_memory(cfg, device)
        trial.set_user_attr("device", _device_name(device))
        trial.set_user_attr("memory_estimate_mb", round(est.peak_mb, 1))
        trial.set_user_attr("memory_budget_mb", round(budget, 1))
        trial.set_user_attr("memory_method", est.method)
        if est.warning:  # shown before the pruning decision that rests on it
            trial.set_user_attr("memory_warning", est.warning)
            console.print(f"  [bold yellow]warning[/]: {escape(est.warning)}")
        if est.peak_mb > budget:
            console.print(f"  [yellow]pruned before training[/]: needs {est.summary()}, budget {budget:,.1f} MiB")
            raise optuna.TrialPruned(f"estimated {est.peak_mb:.1f} MiB > budget {budget:.1f} MiB")
        console.print(f"  memory: {est.summary()} (budget {budget:,.1f} MiB)")

        # the pruner compares trials in the objective's unit: per token only while one tokenizer is swept
        per_byte = s.objective == "bits_per_byte"
        scale, unit = (bits_per_nat_token(cfg), "bits per byte") if per_byte else (1.0, "held-out loss")

        def on_eval(step: int, val_loss: float) -> None:
            value = val_loss * scale
            trial.report(value, step)
            if trial.should_prune():
                console.print(f"  [yellow]pruned at step {step}[/] ({unit} {value:.4f})")
                raise optuna.TrialPruned(f"{unit} {value:.4f} at step {step}")

        runs_root = self.trials_dir / f"{trial.number:04d}"
        trial.set_user_attr("runs_root", str(runs_root))
        run_dir = run_experiment(s.experiment, overrides, runs_root=str(runs_root), on_eval=on_eval)
        trial.set_user_attr("run_dir", str(run_dir))
        return objective_value(run_dir, s.objective)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return f"cuda:{visible or device.index or 0} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def bits_per_nat_token(cfg: ExperimentConfig) -> float:
    """Bits per byte of one nat per token on the held-out split of cfg's data and tokenizer."""
    from micro_arch.data import prepare_data

    data = prepare_data(cfg.data)
    return len(data.val) / (math.log(2) * data.val_bytes)


def objective_value(run_dir: Path, objective: str) -> float:
    if objective == "bits_per_byte":
        from micro_arch.eval.evaluate import evaluate_run

        return float(evaluate_run(run_dir)["bits_per_byte"])
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if summary.get("final_val_loss") is None:
        raise MicroArchError(f"{run_dir}: summary.json has no final_val_loss")
    return float(summary["final_val_loss"])
