"""Checkpoints: everything needed to resume bit-for-bit, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from micro_arch.errors import MicroArchError

FORMAT_VERSION = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise MicroArchError(f"{path}: no checkpoint here; a run writes checkpoints/latest.pt at "
                             "train.checkpoint_every steps and at the end")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        others = sorted(p.name for p in path.parent.glob("step_*.pt") if p != path)
        hint = f"; the run has other checkpoints: {', '.join(others)}" if others else ""
        raise MicroArchError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}); delete it "
                             f"and resume from an earlier one{hint}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise MicroArchError(f"{path}: not a micro-arch checkpoint of format {FORMAT_VERSION}")
    return payload


def latest_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "latest.pt"
