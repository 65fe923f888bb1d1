"""DistributedDataParallel from the outside: torchrun sets RANK/WORLD_SIZE, we join the group."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Process:
    """One `micro-arch <args>` process to run beside others: a seed group's member, a sweep's full training."""
    name: str
    args: list[str]
    log: Path  # its output, appended


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as a child's CUDA_VISIBLE_DEVICES names them (none without CUDA)."""
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def run_in_slots(processes: list[Process], slots: list[dict], console) -> list[str]:
    """Each process with the environment of a free slot (a GPU's CUDA_VISIBLE_DEVICES, say), as many at once as
    there are slots; returns a line for each that failed. Ctrl-C is passed on to the running ones (they save
    and stop), which are waited for, and raised again."""
    pending, running, failed = list(processes), [], []
    try:
        while pending or running:
            while pending and len(running) < len(slots):
                slot = next(s for s in slots if s not in [r[1] for r in running])
                proc = pending.pop(0)
                proc.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(proc.log, "ab")  # noqa: SIM115 (closed when it ends)
                child = subprocess.Popen([sys.executable, "-m", "micro_arch", *proc.args], env={**os.environ, **slot},
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                where = ", ".join(f"{k}={v}" for k, v in slot.items())
                console.print(f"{proc.name} -> {where} (pid {child.pid}, log {proc.log})", highlight=False)
                running.append((proc, slot, child, log))
            time.sleep(1.0)
            for entry in [r for r in running if r[2].poll() is not None]:
                proc, _, child, log = entry
                log.close()
                running.remove(entry)
                if child.returncode:
                    failed.append(f"{proc.name} (exit code {child.returncode}, see {proc.log})")
    except KeyboardInterrupt:
        for _, _, child, _ in running:
            child.send_signal(2)
        for _, _, child, log in running:
            child.wait()
            log.close()
        raise
    return failed
