"""Ctrl-C (SIGINT) or SIGTERM while training: finish the current step, save, and stop cleanly.

The handler only sets a flag; the loop checks it between optimizer steps, where the model and optimizer
are consistent, so the checkpoint it then saves resumes bit-for-bit. A second Ctrl-C in a single process
aborts at once without saving. Under DDP every rank must stop at the same step, so the flag is agreed
across ranks (at log steps), and repeated signals (torchrun forwards its own) are ignored.
A kill -9 cannot be caught: such a run stays "running" in summary.json, whose `updated_at` and `pid`
tell a reader that it is no longer alive.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

from micro_arch.train.distributed import Dist


class RunInterrupted(KeyboardInterrupt):
    """Raised after a signal once the run has been saved; exit_code is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    def __init__(self, dist: Dist, device: torch.device):
        self.dist, self.device = dist, device
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.dist.main:
                print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint"
                      + ("" if self.dist.enabled else " (Ctrl-C again to abort without saving)"),
                      file=sys.stderr, flush=True)
        elif not self.dist.enabled:
            raise KeyboardInterrupt

    def requested(self, step: int, log_every: int) -> int | None:
        """The signal that asked to stop, once every rank agrees (checked at log steps under DDP)."""
        if not self.dist.enabled:
            return self.signum
        if step % log_every:
            return None
        flag = torch.tensor(float(self.signum or 0), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None
