"""DistributedDataParallel from the outside: torchrun sets RANK/WORLD_SIZE, we join the group."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value


def init_distributed(device_type: str) -> Dist:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, cli_args: list[str], rendezvous: list[str] | None = None) -> int:
    """Start `nproc` processes of `micro-arch <cli_args>` through torchrun; returns its exit code. `rendezvous`
    (torchrun's own arguments, e.g. --nnodes=2 --rdzv-endpoint=host:29500 --rdzv-id=sweep) joins the
    processes of several machines; without it they are this machine's alone (--standalone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *(rendezvous or ["--standalone"]),
           f"--nproc_per_node={nproc}", "-m", "micro_arch", *cli_args]
    process = subprocess.Popen(cmd)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them save and stop
            continue
