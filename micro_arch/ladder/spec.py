"""The ladder file (ladders/<name>.yaml): architectures x compute budgets x seeds, and how big a model each
budget trains.

    description: MHA against GQA against MQA
    architectures:                      # name: an experiment folder (relative to this file) + overrides
      mha: {experiment: ../experiments/llama, set: {model.n_kv_heads: 4}}
      mqa: {experiment: ../experiments/mqa}
    budgets: [1e12, 3e12, 1e13]         # training FLOPs: at least 3, the largest at least 10x the smallest
    size:                               # the size rule, one of:
      shapes:                           #   a shape per budget (in the order of budgets), or, with
        - {model.d_model: 64}           #   tokens_per_parameter, the candidate shapes: each budget takes
        - {model.d_model: 96}           #   the one whose tokens per non-embedding parameter come closest
        - {model.d_model: 128}
      tokens_per_parameter: null
    seeds: 2                            # per point: a number (from each experiment's train.seed) or a list
    set: {train.eval_batches: 50}       # overrides for every point
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from micro_arch.config import from_dict, read_yaml
from micro_arch.errors import MicroArchError

MIN_BUDGETS, MIN_SPAN = 3, 10.0


@dataclass
class Architecture:
    experiment: str  # an experiment folder or config file, relative to the ladder file
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class SizeRule:
    shapes: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    tokens_per_parameter: float | None = None


@dataclass
class LadderConfig:
    architectures: dict[str, Architecture]
    budgets: list[float]
    size: SizeRule = field(default_factory=SizeRule)
    seeds: int | list[int] = 2
    set: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    name: str = ""  # the file's stem
    folder: str = ""  # the file's folder: experiments are found from here


def as_overrides(values: dict) -> list[str]:
    """{key: value} as --set items (JSON is YAML, so each value reads back as written)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def load_ladder(path, budgets: list[float] | None = None, seeds=None) -> LadderConfig:
    """The ladder file, checked; `budgets` and `seeds` replace the file's (a quick trial of the path)."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in Path("ladders").glob("*.yaml")) if Path("ladders").is_dir() else []
        raise MicroArchError(f"{path}: no such ladder file; pass a YAML file such as ladders/attention-heads.yaml"
                             + (f" (in ladders/: {', '.join(shipped)})" if shipped else ""))
    raw = read_yaml(path)
    if budgets is not None:
        raw["budgets"] = budgets
    if seeds is not None:
        raw["seeds"] = seeds
    ladder = from_dict(LadderConfig, raw, where=str(path))
    ladder.name, ladder.folder = ladder.name or path.stem, str(path.parent)
    _check(ladder, str(path))
    return ladder


def _check(ladder: LadderConfig, where: str) -> None:
    b = sorted(ladder.budgets)
    if not ladder.architectures:
        raise MicroArchError(f"{where}: architectures is empty; name at least one, e.g. "
                             "architectures: {{base: {{experiment: ../experiments/llama}}}}")
    if len(set(b)) < MIN_BUDGETS or b[0] <= 0:
        raise MicroArchError(f"{where}: budgets {ladder.budgets}: a ladder needs at least {MIN_BUDGETS} different "
                             "positive compute budgets (training FLOPs) to fit a law of 3 parameters")
    if b[-1] / b[0] < MIN_SPAN:
        raise MicroArchError(f"{where}: budgets span {b[-1] / b[0]:.3g}x; the largest must be at least "
                             f"{MIN_SPAN:g}x the smallest, or the fit cannot tell the exponent from the noise")
    if b != list(ladder.budgets):
        raise MicroArchError(f"{where}: budgets {ladder.budgets}: list them from the smallest to the largest")
    shapes = ladder.size.shapes
    if ladder.size.tokens_per_parameter is None and len(shapes) not in (1, len(b)):
        raise MicroArchError(f"{where}: size.shapes has {len(shapes)} shapes for {len(b)} budgets; give one per "
                             "budget (or one for all), or set size.tokens_per_parameter to choose among them")
    if ladder.size.tokens_per_parameter is not None and ladder.size.tokens_per_parameter <= 0:
        raise MicroArchError(f"{where}: size.tokens_per_parameter must be positive, e.g. 20 (Chinchilla)")
    seeds = ladder.seeds
    if (isinstance(seeds, int) and seeds < 1) or (isinstance(seeds, list) and len(set(seeds)) != len(seeds)):
        raise MicroArchError(f"{where}: seeds: a number of seeds (at least 1) or a list of different seeds")
    for name, arch in ladder.architectures.items():
        target = Path(ladder.folder) / arch.experiment
        if not (target / "config.yaml").is_file() and not target.is_file():
            raise MicroArchError(f"{where}: architectures.{name}.experiment: {arch.experiment} is not an "
                                 f"experiment (looked for {target / 'config.yaml'}); paths are relative to the "
                                 "ladder file")
