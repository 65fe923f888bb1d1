"""`micro-arch sweep sweeps/<name>.yaml`: an Optuna study over config values, memory-checked, resumable.

Each trial samples values for dotted config keys, builds the experiment's config with them, and
estimates the peak memory of a training step (micro_arch.memory) before anything trains: a trial
over the memory budget is pruned there and leaves no run directory. The others train a short proxy
budget, report each held-out evaluation to the pruner, and return the held-out loss (or bits per
byte). The study is stored in SQLite under runs/sweeps/<name>/study.db, so a stopped sweep resumes
where it was; afterwards the best `top_k` configurations train in full on all local devices, and a
report (trials table, parameter importances, plots) is written beside the study.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from rich.console import Console
from rich.markup import escape

from micro_arch.config import (
    ExperimentConfig,
    apply_overrides,
    blame_override,
    experiment_path,
    from_dict,
    load_raw,
    materialise_defaults,
    read_yaml,
)
from micro_arch.errors import MicroArchError, closest

console = Console()
EXPERIMENT_SECTIONS = ("model", "data", "train")


@dataclass
class ParamRange:
    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None  # int: default 1; float: none (continuous)
    log: bool = False
    choices: list[Any] | None = None


@dataclass
class SweepConfig:
    experiment: str  # experiment folder (relative to the working directory or to the sweep file)
    search_space: dict[str, ParamRange]  # dotted config key -> range, e.g. model.layers.0.repeat
    name: str = ""  # study name; defaults to the sweep file's name
    n_trials: int = 20
    trial_steps: int | None = None  # proxy budget per trial (one of the two; neither: the experiment's own)
    trial_tokens: int | None = None
    objective: Literal["val_loss", "bits_per_byte"] = "val_loss"
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0
    pruner: Literal["none", "median", "hyperband"] = "median"
    memory_budget_mb: float | None = None  # None: the device's own memory (GPU memory, or the host's RAM)
    top_k: int = 1  # best configurations to train in full afterwards
    full_steps: int | None = None  # their budget (neither: the experiment's own)
    full_tokens: int | None = None
    set: list[str] = field(default_factory=list)  # fixed overrides for every trial, e.g. train.eval_every=50


# --- reading and checking the sweep file -----------------------------------------------------------


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Sweep file + `--set` overrides -> checked SweepConfig. Overrides of model./data./train. keys
    are added to the experiment overrides of every trial; the others change the sweep file's keys."""
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("set", [])
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] in EXPERIMENT_SECTIONS:
            raw["set"] = list(raw["set"]) + [item]
        else:
            apply_overrides(raw, [item])
    try:
        sweep = from_dict(SweepConfig, raw, where=str(path))
    except MicroArchError as err:
        raise blame_override(err, overrides, root=str(path)) from None
    sweep.name = sweep.name or path.stem
    exp = Path(sweep.experiment)
    if not exp.exists() and (path.parent / exp).exists():
        sweep.experiment = str(path.parent / exp)
    experiment_path(sweep.experiment)  # a clear error when there is no such experiment

    def bad(key: str, message: str) -> MicroArchError:  # against the --set override that set it, if one did
        return blame_override(MicroArchError(f"{path}.{key}: {message}", where=f"{path}.{key}"), overrides,
                              root=str(path))

    if sweep.n_trials < 1:
        raise bad("n_trials", f"must be at least 1, got {sweep.n_trials}; a sweep of no trials has nothing to report")
    if sweep.top_k < 0:
        raise bad("top_k", f"must be >= 0 (0: no full training), got {sweep.top_k}")
    for key in ("trial_steps", "trial_tokens", "full_steps", "full_tokens", "memory_budget_mb"):
        if getattr(sweep, key) is not None and getattr(sweep, key) <= 0:
            raise bad(key, f"must be positive, got {getattr(sweep, key)}")
    if sweep.trial_steps and sweep.trial_tokens or sweep.full_steps and sweep.full_tokens:
        raise MicroArchError(f"{path}: give a budget in steps or in tokens, not both")
    if not sweep.search_space:
        raise MicroArchError(f"{path}: search_space is empty; map dotted config keys to ranges, e.g. "
                             "model.d_model: {type: int, low: 64, high: 256, step: 64}")
    check_search_space(sweep, path)
    return sweep


def check_search_space(sweep: SweepConfig, where: Path) -> None:
    """Every key must exist in the experiment's config (defaults filled in), every range must make
    sense, and every endpoint must have a type the config accepts."""
    base = materialise_defaults(load_raw(experiment_path(sweep.experiment)))
    apply_overrides(base, sweep.set)
    for key, r in sweep.search_space.items():
        at = f"{where}: search_space.{key}"
        _check_key_exists(base, key, at)
        if r.type == "categorical":
            if not r.choices:
                raise MicroArchError(f"{at}: a categorical range needs a non-empty list of choices")
            if r.low is not None or r.high is not None:
                raise MicroArchError(f"{at}: a categorical range takes choices, not low/high")
            values = r.choices
        else:
            if r.low is None or r.high is None:
                raise MicroArchError(f"{at}: an {r.type} range needs low and high")
            if r.low > r.high:
                raise MicroArchError(f"{at}: low={r.low} is above high={r.high}")
            if r.choices is not None:
                raise MicroArchError(f"{at}: choices belong to type: categorical")
            if r.type == "int" and any(v is not None and v != int(v) for v in (r.low, r.high, r.step)):
                raise MicroArchError(f"{at}: an int range needs whole numbers for low, high and step")
            if r.step is not None and r.step <= 0:
                raise MicroArchError(f"{at}: step must be positive, got {r.step}")
            if r.log and r.low <= 0:
                raise MicroArchError(f"{at}: a log range needs low > 0, got {r.low}")
            if r.log and r.step is not None and r.type == "float":
                raise MicroArchError(f"{at}: a float range is either log or stepped, not both")
            values = [int(r.low), int(r.high)] if r.type == "int" else [r.low, r.high]
            if sweep.sampler == "grid" and r.type == "float" and r.step is None:
                raise MicroArchError(f"{at}: the grid sampler needs a step for float ranges (or choices)")
        for value in values:  # types: the config's own checks, reported when they concern this key
            trial = copy.deepcopy(base)
            apply_overrides(trial, [f"{key}={json.dumps(value)}"])
            try:
                from_dict(ExperimentConfig, trial, where="config")
            except MicroArchError as err:
                if _where(key) in str(err):
                    raise MicroArchError(f"{at}: value {value!r} is not accepted: {err}") from None


def _where(key: str) -> str:
    """model.layers.0.repeat -> config.model.layers[0].repeat, as from_dict names places."""
    parts = ["config"]
    for p in key.split("."):
        if p.lstrip("-").isdigit():
            parts[-1] += f"[{p}]"
        else:
            parts.append(p)
    return ".".join(parts)


def _check_key_exists(config: dict, key: str, at: str) -> None:
    node, walked = config, []
    for part in key.split("."):
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise MicroArchError(f"{at}: {'.'.join(walked)} is a list of {len(node)}; "
                                     f"{part!r} is not an index in it")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                where = ".".join(walked) or "the config"
                raise MicroArchError(f"{at}: unknown config key {part!r} in {where}{closest(part, node)}; "
                                     f"known keys: {', '.join(map(str, node))}")
            node = node[part]
        else:
            raise MicroArchError(f"{at}: {'.'.join(walked)} is a value, not a section")
        walked.append(part)


# --- the study --------------------------------------------------------------------------------------


def memory_budget_mb(device: torch.device) -> float:
    """The device's own memory: the GPU's, or the host's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    raise MicroArchError("cannot tell this machine's memory; set memory_budget_mb in the sweep file")


def grid_points(sweep: SweepConfig) -> dict[str, list]:
    """The grid sampler's values of each key."""
    grid = {}
    for key, r in sweep.search_space.items():
        if r.type == "categorical":
            grid[key] = list(r.choices)
        elif r.type == "int":
            grid[key] = list(range(int(r.low), int(r.high) + 1, int(r.step or 1)))
        else:
            n = int(round((r.high - r.low) / r.step))
            grid[key] = [r.low + i * r.step for i in range(n + 1)]
    return grid


def _sampler(sweep: SweepConfig, seed: int):
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid_points(sweep), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(sweep: SweepConfig):
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=sweep.trial_steps or "auto")
    return optuna.pruners.NopPruner()


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


class Objective:
    """One trial: sample, check memory (prune before training if over budget), train the proxy budget."""

    def __init__(self, sweep: SweepConfig, runs_root: Path):
        self.sweep, self.runs_root = sweep, Path(runs_root)
        self.trials_dir = sweep_dir(sweep, runs_root) / "trials"

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._trial(trial)
        except KeyboardInterrupt:  # Ctrl-C: not a finished trial, so the next start runs one in its place
            _mark_interrupted(trial.study._storage, trial._trial_id)
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
        cfg = with_vocab(load_experiment(s.experiment, overrides))
        device = resolve_device(cfg.train.device)
        budget = s.memory_budget_mb if s.memory_budget_mb is not None else memory_budget_mb(device)
        est = estimate_memory(cfg, device)
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


def _counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials that count towards n_trials: finished ones, not those a killed sweep left behind."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return trial.state in done and not trial.user_attrs.get("interrupted")


def _close_interrupted(study: optuna.Study) -> None:
    """A sweep killed mid-trial leaves it RUNNING; mark it failed (not counted) so the study moves on."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        _mark_interrupted(study._storage, t._trial_id)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def _mark_interrupted(storage, trial_id: int) -> None:
    """Not counted towards n_trials, and its grid point (if the sampler is a grid) left unvisited: Optuna's
    grid sampler takes any finished trial's point as done, so the interrupted point would never be trained
    and the trial run in its place would repeat another."""
    storage.set_trial_user_attr(trial_id, "interrupted", True)
    if "grid_id" in storage.get_trial_system_attrs(trial_id):
        storage.set_trial_system_attr(trial_id, "grid_id", -1)


def open_study(sweep: SweepConfig, runs_root: str | Path) -> optuna.Study:
    folder = sweep_dir(sweep, runs_root)
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(folder / 'study.db').resolve()}"
    study = optuna.create_study(study_name=sweep.name, storage=storage, load_if_exists=True, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(), pruner=_pruner(sweep))
    _close_interrupted(study)
    # a resumed study gets a fresh sampler seed, so a seeded sampler does not replay the first trials
    study.sampler = _sampler(sweep, sweep.seed + len(study.trials))
    return study


def run_sweep(path, overrides=None, n_trials: int | None = None, runs_root: str | Path = "runs",
              full_training: bool = True) -> optuna.Study:
    """Run (or resume) the sweep in `path` up to n_trials trials, train the best top_k in full, report."""
    from micro_arch.sweep.report import write_report

    sweep = load_sweep(path, overrides)
    if n_trials is not None:
        if n_trials < 1:
            raise MicroArchError(f"--trials / n_trials={n_trials}: must be at least 1; a sweep of no trials has nothing "
                                 "to report")
        sweep.n_trials = n_trials
    if sweep.sampler == "grid":  # past its last point the grid sampler would train points it has trained
        size = math.prod(len(values) for values in grid_points(sweep).values())
        if sweep.n_trials > size:
            console.print(f"note: the grid has {size:,} points, so n_trials={sweep.n_trials:,} is lowered to "
                          f"{size:,}", highlight=False)
            sweep.n_trials = size
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(sweep, runs_root)
    done = sum(_counted(t) for t in study.trials)
    remaining = max(0, sweep.n_trials - done)
    folder = sweep_dir(sweep, runs_root)
    console.print(f"[bold]sweep {sweep.name}[/]: {sweep.experiment}, {len(sweep.search_space)} parameters, "
                  f"{done} of {sweep.n_trials} trials done, {remaining} to run -> {folder}")
    if remaining:
        try:
            with _failed_trials_logged_without_traceback():
                study.optimize(Objective(sweep, Path(runs_root)), n_trials=remaining, catch=(MicroArchError,),
                               gc_after_trial=True)
        except KeyboardInterrupt:
            again = ["micro-arch", "sweep", str(path), *(["--set", *overrides] if overrides else []),
                     *(["--trials", str(n_trials)] if n_trials is not None else [])]
            console.print(f"sweep {sweep.name} stopped; the interrupted trial is not counted. To continue the "
                          f"study (not the trial's run), start the sweep again:\n  {shlex.join(again)}",
                          soft_wrap=True, highlight=False)
            raise
    finals = train_best(study, sweep, runs_root) if full_training and sweep.top_k else []
    write_report(study, folder, sweep, finals, console=console)
    return study


@contextlib.contextmanager
def _failed_trials_logged_without_traceback():
    """Optuna logs a failed trial with its traceback; for Ctrl-C and a MicroArchError (whose message says what
    was wrong) the one line of the error is the whole story."""
    log = logging.getLogger("optuna.study._optimize")

    def drop_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and issubclass(record.exc_info[0], (KeyboardInterrupt, MicroArchError)):
            record.exc_info = None
        return True

    log.addFilter(drop_traceback)
    try:
        yield
    finally:
        log.removeFilter(drop_traceback)


def train_best(study: optuna.Study, sweep: SweepConfig, runs_root: str | Path) -> list[dict]:
    """Train the top_k completed trials with the full budget, each once (a resumed sweep skips those
    already trained), on every local device: one process per GPU, or one on a CPU."""
    from micro_arch.commands.run import run_experiment

    record = sweep_dir(sweep, runs_root) / "full_runs.json"
    finals = json.loads(record.read_text()) if record.is_file() else []
    trained = {f["trial"] for f in finals}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = sorted(complete, key=lambda t: t.value)[: sweep.top_k]
    nproc = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    for rank, trial in enumerate(best, 1):
        if trial.number in trained:
            continue
        overrides = sweep.set + param_overrides(trial.params) + budget_overrides(sweep.full_steps, sweep.full_tokens)
        console.rule(f"[bold]full training {rank}/{len(best)}[/]: trial {trial.number} "
                     f"(proxy {sweep.objective} {trial.value:.4f}) on {nproc} process(es)")
        experiment_runs = Path(runs_root) / _experiment_name(sweep, overrides)
        before = set(experiment_runs.iterdir()) if experiment_runs.is_dir() else set()
        run_dir = run_experiment(sweep.experiment, overrides, runs_root=str(runs_root), nproc=nproc)
        if run_dir is None:  # launched through torchrun: find the new directory
            new = sorted(set(experiment_runs.iterdir()) - before) if experiment_runs.is_dir() else []
            run_dir = new[-1] if new else None
        finals.append({"trial": trial.number, "params": trial.params, "proxy_value": trial.value,
                       "run_dir": str(run_dir) if run_dir else None})
        record.write_text(json.dumps(finals, indent=2) + "\n")
    return finals


def _experiment_name(sweep: SweepConfig, overrides: list[str]) -> str:
    from micro_arch.experiment import load_experiment

    return load_experiment(sweep.experiment, overrides).name

