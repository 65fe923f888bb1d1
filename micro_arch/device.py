"""Which device to train on, and in which precision."""

from __future__ import annotations

import contextlib
import os
import resource
import sys

import torch

from micro_arch.errors import MicroArchError


def resolve_device(spec: str = "auto", local_rank: int | None = None, option: str = "train.device") -> torch.device:
    """The device `spec` names ('auto': the GPU if there is one); errors name `option`, the config key or the
    command-line flag the spec came from, and its fix in that form (train.device=cpu, --device cpu)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    flag = option.startswith("-")
    said, fix = (f"{option} {spec}", f"{option} cpu") if flag else (f"{option}={spec!r}", f"{option}=cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise MicroArchError(f"{said} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MicroArchError(f"{said} but no CUDA GPU is visible; use {fix}")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked, or ('auto') on GPUs that support it; full fp32 otherwise."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def set_threads() -> None:
    """One process per core under torchrun on a CPU, unless the user chose OMP_NUM_THREADS."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
