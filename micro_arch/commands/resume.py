"""`micro-arch run --resume RUN_DIR`: the run folder, the settings and the checkpoint a resume starts from.

A resumed run keeps its own settings (the config.yaml in its folder); only an explicit `--set` changes them,
and run.check_resumable allows only the budget, the cadences and where it runs to change. So resuming a
completed run without `--set` changes nothing, and extending one says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from micro_arch.config import (
    ExperimentConfig,
    apply_overrides,
    blame_override,
    dotted,
    from_dict,
    read_yaml,
    to_dict,
)
from micro_arch.errors import MicroArchError
from micro_arch.experiment import check_consistency
from micro_arch.hf.init import PARENT_FILE, resolve_source, run_dir_of
from micro_arch.rundir import read_run_config, read_summary
from micro_arch.train.loop import planned_steps


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_resume_dir(resume) -> Path:
    """--resume names a run folder: say so when it is a file (a checkpoint: how to pick it) or not a run."""
    path = Path(resume)
    if path.is_file():
        hint = (f"; to resume from this checkpoint, pass --resume {path.parent.parent} --checkpoint {path.name}"
                if path.parent.name == "checkpoints" else "")
        raise MicroArchError(f"--resume {path}: a file, not a run directory; pass the run's folder, such as "
                             f"runs/<experiment>/<run-id>{hint}")
    read_run_config(path)  # 'no such run directory' / 'not a run directory (no config.yaml)'
    return path


def resumed_config(run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """A resumed run keeps its own settings, its folder's config.yaml; only `--set` overrides change them
    (and check_resumable allows only the budget, cadences and where it runs to change)."""
    where = str(run_dir / "config.yaml")
    try:
        cfg = from_dict(ExperimentConfig, apply_overrides(read_yaml(run_dir / "config.yaml"), overrides), where=where)
    except MicroArchError as err:
        raise blame_override(err, overrides, root=where) from None
    check_consistency(cfg)
    return cfg


def note_experiment_differs(run_dir: Path, target, experiment: ExperimentConfig, cfg: ExperimentConfig) -> None:
    """Say which settings of the experiment as it is now the resumed run does not take (its own stay)."""
    now, run = dotted(to_dict(experiment)), dotted(to_dict(cfg))
    differ = [k for k in now if now[k] != run.get(k) and not (k == "model.vocab_size" and now[k] is None)]
    if differ:
        shown = "; ".join(f"{k}: {run.get(k)!r} in the run, {now[k]!r} in {target}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        warn(f"{run_dir} resumes with its own settings (its config.yaml), not the experiment's where they differ "
             f"({shown}{more}); --set changes the budget, e.g. --set train.max_steps=N")


def same_start(run_dir: Path, init_from) -> bool:
    """Whether init_from is the checkpoint of the step the run began from (its parent.json), of the same run."""
    began = json.loads((run_dir / PARENT_FILE).read_text()) if (run_dir / PARENT_FILE).is_file() else {}
    if not init_from or began.get("type") != "micro-arch run" or began.get("step") is None:
        return False
    try:
        kind, path = resolve_source(str(init_from))
    except MicroArchError:
        return False
    return (kind == "checkpoint" and path.name == f"step_{began['step']:07d}.pt"
            and str(run_dir_of(kind, path).resolve()) == began.get("path"))


def check_same_model(run_dir: Path, path: Path, payload: dict, cfg: ExperimentConfig, explicit) -> None:
    """A checkpoint of another model (--checkpoint OTHER/latest.pt, or another run's file copied in) is refused
    in one line, naming the first setting that differs, before any weights are loaded."""
    saved = (payload.get("config") or {}).get("model")
    if not isinstance(saved, dict):
        return  # a checkpoint from before the config was kept in it: load_weights still checks the shapes
    mine = to_dict(cfg)["model"]
    differ = [k for k in mine if k in saved and k != "init_from" and saved[k] != mine[k]]
    if differ:
        k = differ[0]
        how = (f"--checkpoint {explicit}" if explicit else str(path))
        raise MicroArchError(f"{how}: a checkpoint of another model (model.{k} is {saved[k]!r} there, {mine[k]!r} in "
                             f"{run_dir / 'config.yaml'}), not of this run; resume from one of the run's own "
                             f"checkpoints (--checkpoint step_N.pt), or remove {path} if it was copied in")


def say_if_extending(run_dir: Path, payload: dict, cfg: ExperimentConfig, world_size: int) -> None:
    """Resuming a completed run with a larger explicit budget trains it further: say so, and what stays."""
    if read_summary(run_dir).get("status") == "completed":
        step = payload["step"]
        print(f"{run_dir}: extending the completed run from {step:,} to {planned_steps(cfg, world_size):,} steps "
              f"(--set); checkpoints/step_{step:07d}.pt keeps it as it finished, and metrics.csv keeps its rows")
