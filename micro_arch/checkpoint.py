"""Checkpoints: everything needed to resume bit-for-bit, written atomically, found again after a crash."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from micro_arch.errors import MicroArchError

FORMAT_VERSION = 1
LATEST = "latest.pt"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_checkpoint(path: Path, payload: dict, also: Path | None = None) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written checkpoint.
    `also` (e.g. latest.pt) gets a byte copy of the file, itself replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, **payload}, _tmp(path))
    os.replace(_tmp(path), path)
    if also is not None:
        shutil.copyfile(path, _tmp(also))
        os.replace(_tmp(also), also)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise MicroArchError(f"{path}: no checkpoint here; a run writes checkpoints/latest.pt at "
                             "train.checkpoint_every steps and at the end")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        others = sorted(p.name for p in path.parent.glob("step_*.pt") if p != path)
        hint = f"; the run has other checkpoints: {', '.join(others)} (pick one with --checkpoint)" if others else ""
        raise MicroArchError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}){hint}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise MicroArchError(f"{path}: not a micro-arch checkpoint of format {FORMAT_VERSION}")
    return payload


def load_weights(model, state: dict, what: str) -> None:
    """model.load_state_dict, with a one-line error (not torch's list of size mismatches) when `what`
    (e.g. "runs/x/<id>/checkpoints/latest.pt") holds the weights of another model: for generate, eval,
    export and chat (rundir.load_run) and for the trainer's resume alike."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err).splitlines()[0])
        raise MicroArchError(f"{what}: the weights do not fit this model; they are a checkpoint of another "
                             f"configuration ({detail})") from None


def latest_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / LATEST


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's step_N.pt files, newest step first."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("step_*.pt")
             if (m := _STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def has_checkpoints(run_dir: Path) -> bool:
    return latest_checkpoint(run_dir).is_file() or bool(step_checkpoints(run_dir))


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Delete the *.tmp files a process killed in the middle of a save leaves; returns what it removed."""
    stale = sorted(Path(run_dir).glob("*.tmp")) + sorted((Path(run_dir) / "checkpoints").glob("*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def resolve_checkpoint(run_dir: Path, name: str | Path) -> Path:
    """`--checkpoint`: a file name inside RUN_DIR/checkpoints (step_0000012.pt, latest.pt) or a path."""
    run_dir, given = Path(run_dir), Path(name)
    for path in (run_dir / "checkpoints" / given.name if given.parent == Path(".") else None, given):
        if path is not None and path.is_file():
            return path
    have = [p.name for p in step_checkpoints(run_dir)] + ([LATEST] if latest_checkpoint(run_dir).is_file() else [])
    raise MicroArchError(f"--checkpoint {name}: no such checkpoint in {run_dir / 'checkpoints'}; "
                         + (f"it has: {', '.join(have)}" if have else "it has none"))


def load_for_resume(run_dir: Path, explicit: str | Path | None = None, map_location="cpu"
                    ) -> tuple[dict, Path, list[str]]:
    """(payload, its file, the files skipped and why): the named checkpoint, else latest.pt, else the
    newest intact step_N.pt; corrupt or truncated files are skipped (the caller warns about them)."""
    if explicit is not None:
        path = resolve_checkpoint(run_dir, explicit)
        return load_checkpoint(path, map_location), path, []
    candidates = [latest_checkpoint(run_dir)] if latest_checkpoint(run_dir).is_file() else []
    candidates += step_checkpoints(run_dir)
    if not candidates:
        raise MicroArchError(f"{run_dir}: no checkpoint to resume from (checkpoints/ has no latest.pt or step_N.pt); "
                             "start a new run without --resume")
    broken = []
    for path in candidates:
        try:
            payload = load_checkpoint(path, map_location)
        except MicroArchError as err:
            broken.append(f"{path.name} ({str(err).split(': ', 1)[1].split(';')[0]})")
            continue
        return payload, path, broken
    raise MicroArchError(f"{run_dir}: no intact checkpoint to resume from: {', '.join(broken)}; "
                         "start a new run without --resume")
