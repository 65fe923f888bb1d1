"""A sweep file: its keys (SweepConfig), reading it with `--set` overrides, and checking its search space
against the experiment's config before any trial starts."""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    heartbeat_s: int = 60  # a running trial's worker says it is alive this often (Optuna's heartbeat)
    max_retries: int = 2  # a trial whose worker died (no heartbeat for 3 x heartbeat_s) runs again this often


# --- reading and checking the sweep file -----------------------------------------------------------


def load_sweep(path: str | Path, overrides: list[str] | None = None, n_trials: int | None = None,
               say=None) -> SweepConfig:
    """Sweep file + `--set` overrides (+ `--trials`) -> checked SweepConfig. Overrides of model./data./train.
    keys are added to the experiment overrides of every trial; the others change the sweep file's keys.
    A grid's n_trials is lowered to its size (past its last point it would train points twice); say(text)
    tells the user."""
    sweep = _load(path, overrides)
    if n_trials is not None:
        if n_trials < 1:
            raise MicroArchError(f"--trials / n_trials={n_trials}: must be at least 1; a sweep of no trials has "
                                 "nothing to report")
        sweep.n_trials = n_trials
    if sweep.sampler == "grid":
        size = math.prod(len(values) for values in grid_points(sweep).values())
        if sweep.n_trials > size:
            if say is not None:
                say(f"note: the grid has {size:,} points, so n_trials={sweep.n_trials:,} is lowered to {size:,}")
            sweep.n_trials = size
    return sweep


def grid_points(sweep: SweepConfig) -> dict[str, list]:
    """The grid's values of each key."""
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


def _load(path: str | Path, overrides: list[str] | None) -> SweepConfig:
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
    if sweep.heartbeat_s < 1:
        raise bad("heartbeat_s", f"must be at least 1 (seconds), got {sweep.heartbeat_s}")
    if sweep.max_retries < 0:
        raise bad("max_retries", f"must be >= 0 (0: a dead worker's trial is failed, not run again), "
                  f"got {sweep.max_retries}")
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
    candidates = {}
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
            values = [r.low, r.high]
            if r.type == "int":  # every value of a short range (d_model 16..64 step 16 has 48 for n_heads=3)
                points = range(int(r.low), int(r.high) + 1, int(r.step or 1))
                values = list(points) if len(points) <= 16 and not r.log else [int(r.low), int(r.high)]
            if sweep.sampler == "grid" and r.type == "float" and r.step is None:
                raise MicroArchError(f"{at}: the grid sampler needs a step for float ranges (or choices)")
        candidates[key] = values
    _check_values_in_combination(base, candidates, where)


MAX_COMBINATIONS = 64  # of the other keys' candidate values, tried for each value of a key


def _check_values_in_combination(base: dict, candidates: dict[str, list], where: Path) -> None:
    """A value is refused only when no combination with the other keys' candidate values (choices, or the
    ends of a range) makes a config that the config's own checks accept for this key: d_model {48, 96} with
    n_heads {3} is fine, though n_heads=3 with the base d_model=128 is not. A combination that fails is
    found again when a trial samples it, and that trial is pruned before it trains."""
    for key, values in candidates.items():
        others = {k: v for k, v in candidates.items() if k != key}
        for value in values:
            errors = []
            for combo in itertools.islice(itertools.product(*others.values()), MAX_COMBINATIONS):
                error = config_error(base, {key: value, **dict(zip(others, combo))})
                if error is None or _where(key) not in error:
                    break
                errors.append(error)
            else:
                with_others = " with any combination of the other swept values" if others else ""
                raise MicroArchError(f"{where}: search_space.{key}: value {value!r} is not accepted{with_others}: "
                                     f"{errors[0]}")


def config_error(base: dict, params: dict) -> str | None:
    """The config's own complaint about base with params set, or None when it is a valid config."""
    trial = copy.deepcopy(base)
    apply_overrides(trial, [f"{k}={json.dumps(v)}" for k, v in params.items()])
    try:
        from_dict(ExperimentConfig, trial, where="config")
    except MicroArchError as err:
        return str(err)
    return None


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
