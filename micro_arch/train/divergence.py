"""A run whose loss or gradient norm stops being finite is stopped, marked 'diverged', and explained.

The check never reads the device on its own: every step folds "is this step's loss (and gradient norm)
finite?" into one device tensor holding the first step that was not, and that tensor is read where the
host waits for the device anyway (log, evaluation and checkpoint steps). A checkpoint is written only
of finite weights, so the last checkpoint of a diverged run is its last finite one.
"""

from __future__ import annotations

import math

import torch

from micro_arch.errors import MicroArchError


class RunDiverged(MicroArchError):
    """The run stopped on a non-finite loss, gradient norm or weights; the message names likely causes.
    Every rank of a DDP run raises it at the same step; only rank 0's is printed (`main_only`)."""

    main_only = True

    def __init__(self, message: str, first_step: int, found_at: int):
        super().__init__(message)
        self.first_step, self.found_at = first_step, found_at


class FiniteWatch:
    def __init__(self, device: torch.device, dist):
        self.dist = dist
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, step: int, *values) -> None:
        """Fold one step's scalars in (device tensors; None and plain numbers are skipped)."""
        for value in values:
            if torch.is_tensor(value):
                bad = ~torch.isfinite(value.detach()).all()
                self.first_bad.masked_fill_(bad & (self.first_bad < 0), step)

    def first_bad_step(self) -> int | None:
        """The first step of a non-finite value on any rank (one read of the device), or None."""
        flag = self.first_bad.clone()
        if self.dist.enabled:
            flag = torch.where(flag < 0, torch.iinfo(torch.long).max, flag)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            flag = torch.where(flag == torch.iinfo(torch.long).max, -1, flag)
        step = int(flag.item())
        return None if step < 0 else step


def weights_finite(model, dist) -> bool:
    """Whether every parameter of the model is finite, on every rank (one read of the device)."""
    params = [p for p in model.parameters()]
    if not params:
        return True
    ok = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all().to(torch.float32)
    if dist.enabled:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def diverged_message(cfg, device: torch.device, first_step: int | None, found_at: int, what: str,
                     fresh_start: bool, checkpoint: str | None, run_dir) -> str:
    """One line: what was not finite and when, what was kept, and the likely causes for this config."""
    t = cfg.train
    when = (f"at step {first_step:,}" + (f" (found at step {found_at:,})" if found_at != first_step else "")
            if first_step is not None else f"by step {found_at:,}")
    kept = (f"the last finite checkpoint, {checkpoint}, is kept" if checkpoint else
            "it diverged before its first checkpoint, so there are no weights to keep")
    causes = []
    if fresh_start and first_step == 1:  # the first loss comes from the initial weights: no update yet
        causes.append("the model gives NaN or inf before any update, so a block or a block argument is the "
                      "likely cause (e.g. Attn(rope_theta=0), a norm's eps=0, a block of your own), not the "
                      "learning rate")
    else:
        causes.append(f"the learning rate is too high (train.lr={t.lr:g}; try a tenth of it, or more "
                      "train.warmup_steps)")
        if t.grad_clip is None:
            causes.append("gradient clipping is off (train.grad_clip: null; try train.grad_clip=1.0)")
        causes.append("a block argument that makes the model unstable (e.g. Attn(rope_theta=0))")
    if t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda"):
        causes.append(f"reduced precision (train.precision={t.precision}; try train.precision=fp32)")
    return (f"{run_dir}: the run diverged: {what} was not finite (NaN or inf) {when}; it stopped at step "
            f"{found_at:,} with status 'diverged' in summary.json, and {kept}. Likely causes: {'; '.join(causes)}. Fix the setting and "
            "start a new run (resuming would diverge again)")


def finite(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))
