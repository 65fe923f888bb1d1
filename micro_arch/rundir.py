"""Run directories: created fresh for every run, and enough on their own to rebuild the model."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import time
from pathlib import Path

import yaml

from micro_arch.config import ExperimentConfig, dotted, from_dict, read_yaml, to_dict
from micro_arch.data.sources import BUILTIN
from micro_arch.errors import MicroArchError

SUMMARY_FORMAT_VERSION = 1  # of summary.json; bump when its keys change meaning, so compare can tell old runs


# train keys that leave the trained model as it is: how often to log, evaluate, save and sample, and where
NOT_THE_CONFIGURATION = {"seed", "eval_every", "eval_batches", "log_every", "checkpoint_every", "sample", "device",
                         "compile", "compile_mode"}

GROUP_FILE = "group.json"  # a seed group's folder: its seeds and settings; one run folder per seed inside


def member_dir(group: Path, seed: int) -> Path:
    """The run folder of one seed of a seed group (micro-arch run --seeds)."""
    return group / f"seed-{seed}"


def group_id(cfg: ExperimentConfig) -> str:
    """A stable id of the resolved configuration without its seed: runs with one group id differ only in
    train.seed (and in how often they logged, evaluated and saved), so their spread is training noise.
    Only values that differ from the defaults count, so a config key added later (at its default) leaves
    the ids of earlier runs as they were."""
    full = to_dict(cfg)
    full.pop("description", None)
    full["train"] = {k: v for k, v in full["train"].items() if k not in NOT_THE_CONFIGURATION}
    defaults = dotted(to_dict(ExperimentConfig()), whole=("defaults",))  # model.defaults: one value
    changed = {k: v for k, v in dotted(full, whole=("defaults",)).items() if k not in defaults or defaults[k] != v}
    text = json.dumps(changed, sort_keys=True, default=str)
    return f"{cfg.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check_run_name(name: str) -> None:
    """A run's name becomes one folder under the runs directory (runs/<name>/<run-id>): one path component."""
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise MicroArchError(f"name {name!r}: a run's name is one folder name (runs go to RUNS_DIR/<name>/<run-id>), "
                             "without '/', '\\' or '..'; pick another --runs-dir to put runs elsewhere",
                             where="name")


def new_run_dir(runs_root: str | Path, experiment: str) -> Path:
    """runs/<experiment>/<time>-<random>: a new run never reuses an old run's directory."""
    check_run_name(experiment)
    parent = Path(runs_root) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise MicroArchError(f"could not create a new run directory under {parent}")


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    full = to_dict(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    write_json(run_dir / "model_config.json", full["model"])
    write_json(run_dir / "train_config.json", full["train"])
    write_json(run_dir / "data_config.json", full["data"])


def read_run_config(run_dir: str | Path, anchor: bool = False) -> ExperimentConfig:
    """The run's config.yaml. With `anchor`, its relative paths are found as the run found them (`anchored`)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise MicroArchError(f"{run_dir}: no such run directory")
    if not path.is_file():
        inside = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
        hint = (f"it holds runs: pass one of them, e.g. {run_dir / inside[-1]} (the newest of {len(inside)})"
                if inside else "pass a run folder such as runs/<experiment>/<run-id>")
        raise MicroArchError(f"{run_dir}: not a run directory (no config.yaml); {hint}")
    cfg = from_dict(ExperimentConfig, read_yaml(path), where=str(path))
    return anchored(cfg, run_dir) if anchor else cfg


def anchored(cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """Relative paths in a run's config (data sources, a tokenizer model, model.init_from) are relative to the
    folder the run was started in, which summary.json records as `started_in`. Evaluating, sampling or
    comparing the run from another folder finds them there: a relative path that does not exist from here
    but does from there becomes that absolute path. The config is changed in place and returned."""
    summary = run_dir / "summary.json"
    try:
        origin = json.loads(summary.read_text()).get("started_in") if summary.is_file() else None
    except (OSError, ValueError):
        origin = None
    if not origin:
        return cfg

    def find(path, local: bool = True):
        if not local or not isinstance(path, str) or Path(path).is_absolute() or Path(path).exists():
            return path
        there = Path(origin) / path
        return str(there) if there.exists() or glob.glob(str(there)) else path

    data = cfg.data
    for entry in [data] if isinstance(data.source, str) else data.source:  # hub names and 'shakespeare' stay
        entry.source = find(entry.source, entry.source != BUILTIN)
    data.val_source = find(data.val_source)
    data.tokenizer = find(data.tokenizer, data.tokenizer.endswith(".model"))
    cfg.model.init_from = find(cfg.model.init_from)
    return cfg


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device="cpu"):
    """(config, model with trained weights in eval mode, tokenizer) from a run directory alone."""
    import torch

    from micro_arch.checkpoint import latest_checkpoint, load_checkpoint, load_weights, resolve_checkpoint
    from micro_arch.data import load_tokenizer
    from micro_arch.model.model import Model
    from micro_arch.model.registry import load_experiment_blocks

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, anchor=True)
    load_experiment_blocks(run_dir)  # the run's copies of its experiment's blocks, if it has any
    file = resolve_checkpoint(run_dir, checkpoint) if checkpoint else latest_checkpoint(run_dir)
    summary = read_summary(run_dir)
    if not file.is_file() and summary.get("status") == "diverged":
        raise MicroArchError(f"{run_dir}: this run diverged at step {summary.get('diverged_at_step')} before its "
                             "first checkpoint, so it has no weights to load; see its summary.json for the likely "
                             "causes, and train it again with the setting fixed")
    payload = load_checkpoint(file, device)
    model = Model(cfg.model)
    load_weights(model, payload["model"], f"{file} (for {run_dir / 'config.yaml'})")
    if not all(bool(torch.isfinite(t).all()) for t in payload["model"].values() if t.is_floating_point()):
        raise MicroArchError(f"{file}: its weights are not finite (NaN or inf): the run diverged before this "
                             "checkpoint was written; use an earlier checkpoint (--checkpoint step_N.pt), or train "
                             "the run again with a lower train.lr or train.grad_clip set")
    model.to(device).eval()
    return cfg, model, load_tokenizer(run_dir)


def read_summary(run_dir: str | Path) -> dict:
    """The run's summary.json, or {} when it has none or it cannot be read."""
    try:
        found = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
