"""The ladder's points, each an ordinary run folder, trained resumably:

    runs/ladders/<name>/
        plan.json                       every point's experiment and overrides
        <arch>/<budget>/seed-<s>/       one run per (architecture, budget, seed), trained to train.budget_flops

A completed point is never trained again; an interrupted one resumes from its checkpoint; one that never
reached a checkpoint starts again. A point whose settings differ from the plan's (the ladder file changed)
is an error rather than a silent mix of two ladders.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from micro_arch.errors import MicroArchError
from micro_arch.ladder.spec import LadderConfig, as_overrides
from micro_arch.rundir import write_json

console = Console()
PLAN_FILE = "plan.json"


@dataclass
class Point:
    arch: str
    budget: float  # the training FLOPs asked for
    seed: int
    target: str  # the experiment folder
    overrides: list[str]
    folder: Path

    @property
    def key(self) -> str:
        return f"{self.arch}/{budget_name(self.budget)}/seed-{self.seed}"


def budget_name(flops: float) -> str:
    return f"{flops:.3g}".replace("+", "")


def ladder_folder(ladder: LadderConfig, runs_root) -> Path:
    return Path(runs_root) / "ladders" / ladder.name


def plan_points(ladder: LadderConfig, runs_root) -> list[Point]:
    """Every (architecture, budget, seed) of the ladder with the overrides that train it."""
    from micro_arch.config import load_config

    root = ladder_folder(ladder, runs_root)
    points = []
    for arch_name, arch in ladder.architectures.items():
        target = str(Path(ladder.folder) / arch.experiment)
        base = [*as_overrides(ladder.set), *as_overrides(arch.set)]
        seeds = ladder.seeds if isinstance(ladder.seeds, list) else [
            load_config(target, base).train.seed + i for i in range(ladder.seeds)]
        shapes = _shapes(ladder, target, base)
        for budget, shape in zip(ladder.budgets, shapes):
            for seed in seeds:
                overrides = [*base, *as_overrides(shape), f"train.budget_flops={budget:.6g}", "train.max_tokens=null",
                             "train.budget_tokens=null", f"train.seed={seed}"]
                points.append(Point(arch_name, budget, seed, target, overrides,
                                    root / arch_name / budget_name(budget) / f"seed-{seed}"))
    return points


def _shapes(ladder: LadderConfig, target: str, base: list[str]) -> list[dict]:
    """The shape each budget trains: as listed, or the candidate closest to size.tokens_per_parameter."""
    shapes, ratio = ladder.size.shapes, ladder.size.tokens_per_parameter
    if ratio is None:
        return shapes * len(ladder.budgets) if len(shapes) == 1 else list(shapes)
    sizes = [model_size(target, [*base, *as_overrides(s)]) for s in shapes]  # (non-embedding params, FLOPs/token)
    chosen = []
    for budget in ladder.budgets:
        fit = [abs(math.log(budget / flops / params / ratio)) for params, flops in sizes]
        chosen.append(shapes[fit.index(min(fit))])
    return chosen


def model_size(target: str, overrides: list[str]) -> tuple[int, float]:
    """(non-embedding parameters, training FLOPs per token) of the experiment with these overrides."""
    import torch

    from micro_arch.data import prepare_data
    from micro_arch.experiment import load_experiment
    from micro_arch.model.model import Model
    from micro_arch.train.loop import training_flops_per_token

    cfg = load_experiment(target, overrides)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = prepare_data(cfg.data).tokenizer.vocab_size
    with torch.device("meta"):
        params = Model(cfg.model).num_params(non_embedding=True)
    return params, training_flops_per_token(cfg)


def point_state(point: Point) -> str:
    from micro_arch.commands.seeds import member_state

    return member_state(point.folder)


def check_plan(points: list[Point], root: Path) -> None:
    """The points already in the ladder's folder were planned with the same settings as now; then the plan
    is written (plan.json)."""
    plan_file = root / PLAN_FILE
    old = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    for p in points:
        was = old.get(p.key)
        if was is not None and was["overrides"] != p.overrides and point_state(p) != "fresh":
            changed = sorted(set(p.overrides) ^ set(was["overrides"]))
            raise MicroArchError(f"{p.folder}: this point was trained with other settings ({', '.join(changed)}); "
                                 "the ladder file changed since: restore it, or train the new ladder in another "
                                 "folder (--runs-dir)")
    root.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, {**old, **{p.key: {"target": p.target, "overrides": p.overrides, "arch": p.arch,
                                             "budget": p.budget, "seed": p.seed} for p in points}})


def train_points(points: list[Point], runs_root, extra: list[str] | None = None) -> dict[str, int]:
    """Train every point that is not completed; returns how many points were {completed, trained}."""
    from micro_arch.commands.run import run_experiment
    from micro_arch.commands.seeds import Job, gpus_for, side_by_side
    from micro_arch.config import load_config

    todo = [p for p in points if point_state(p) != "completed"]
    total_flops = sum(p.budget for p in todo)
    console.print(f"[bold]ladder[/]: {len(points)} points, {len(points) - len(todo)} completed, {len(todo)} to "
                  f"train ({total_flops:.3g} training FLOPs)", highlight=False)
    gpus = gpus_for(load_config(todo[0].target, todo[0].overrides).train.device) if todo else []
    if len(gpus) > 1 and len(todo) > 1:  # one point per GPU, side by side
        side_by_side([Job(p.key, p.target, [*p.overrides, *(extra or [])], p.folder, point_state(p)) for p in todo],
                     runs_root, gpus)
        return {"completed": len(points) - len(todo), "trained": len(todo)}
    done_flops, start = 0.0, time.monotonic()
    for i, p in enumerate(todo):
        spent = time.monotonic() - start
        eta = (f", about {spent / done_flops * (total_flops - done_flops) / 60:.0f} min left"
               if done_flops else "")
        console.rule(f"[{i + 1}/{len(todo)}] {p.arch} at {p.budget:.3g} FLOPs, seed {p.seed}{eta}")
        state = point_state(p)
        if state == "fresh" and p.folder.exists():
            shutil.rmtree(p.folder)  # a start that never reached a checkpoint: nothing to keep
        run_experiment(p.target, overrides=[*p.overrides, *(extra or [])], runs_root=runs_root,
                       resume=p.folder if state == "resumable" else None,
                       into=p.folder if state == "fresh" else None)
        done_flops += p.budget
    return {"completed": len(points) - len(todo), "trained": len(todo)}


def point_results(points: list[Point]):
    """A DataFrame of the completed points: arch, budget, seed, flops (tokens seen x FLOPs per token, what
    the run really spent), loss (the final held-out loss of the trainer), params, folder."""
    import pandas as pd

    rows = []
    for p in points:
        summary_file = p.folder / "summary.json"
        if not summary_file.is_file():
            continue
        s = json.loads(summary_file.read_text())
        loss = s.get("final_val_loss")
        if s.get("status") != "completed" or loss is None or not math.isfinite(loss):
            continue  # unfinished, or diverged: the fit leaves it out (point_results' caller counts it missing)
        rows.append({"arch": p.arch, "budget": p.budget, "seed": p.seed,
                     "flops": s["tokens_seen"] * s["flops_per_token"], "loss": s["final_val_loss"],
                     "params_non_embedding": s.get("params_non_embedding"), "tokens": s["tokens_seen"],
                     "folder": str(p.folder)})
    return pd.DataFrame(rows, columns=["arch", "budget", "seed", "flops", "loss", "params_non_embedding", "tokens",
                                       "folder"])
