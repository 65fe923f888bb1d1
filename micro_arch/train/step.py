"""One optimizer step: the stage's loss on each micro-batch, backward, clipping, the optimizer update.

A training stage is a loss function `loss_fn(model, batch) -> (loss, metrics)`:
- `model` is what to call (the compiled and/or DDP-wrapped model), `batch` is what the stage's batch
  source returned for this micro-step, already on the device;
- `loss` is the scalar to differentiate (auxiliary losses included);
- `metrics` maps names to detached scalar tensors (never Python numbers: reading them would stall the
  device every step); "train_loss" is the one the progress bar shows. Each is averaged over the
  micro-batches and over the log window, and read on the host only at log steps.
A stage hands its loss to the Trainer in StagePieces (with its batch source and held-out measurement),
built by its Stage object (micro_arch.stages); pretraining's loss is `lm_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from micro_arch.config import TrainConfig
from micro_arch.device import autocast
from micro_arch.train.optim import lr_factor, set_lr

LossFn = Callable[[torch.nn.Module, tuple], tuple[torch.Tensor, dict]]


@dataclass
class StagePieces:
    """What a training stage brings the trainer: where batches come from, what loss they train, how to evaluate."""

    source: object  # .batch(index) -> tuple of CPU tensors; index = step * grad_accum + micro
    loss_fn: Callable  # (model, batch) -> (loss, metrics); see micro_arch.train.step
    held_out: Callable  # (model) -> (val_loss, {further metric: value}) with the model in eval mode
    reference: torch.nn.Module | None = None  # DPO: the frozen starting weights
    notes: list[str] = field(default_factory=list)  # what was skipped or cut, for the console at the start


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Pretraining: next-token cross-entropy (+ the blocks' auxiliary losses, e.g. MoE balancing)."""
    x, y = batch
    out = model(x, y)
    metrics = {"train_loss": out.ce_loss.detach()}
    metrics.update({f"aux/{k}": v.detach() for k, v in out.aux_losses.items()})
    metrics.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.stats.items()})
    return out.loss, metrics


class TrainStep:
    """`step(index, batches)` runs one optimizer step and returns its metrics as device tensors."""

    def __init__(self, model, forward_model, optimizer, cfg: TrainConfig, device: torch.device, distributed: bool,
                 total_steps: int, loss_fn: LossFn):
        self.model, self.forward_model, self.optimizer = model, forward_model, optimizer
        self.cfg, self.device, self.distributed = cfg, device, distributed
        self.total_steps, self.loss_fn = total_steps, loss_fn
        self.grad_norm: torch.Tensor | None = None  # of the last step, on the device (when clipping)

    def __call__(self, step: int, batches: list) -> dict:
        cfg, n = self.cfg, len(batches)
        set_lr(self.optimizer, lr_factor(step, cfg, self.total_steps))
        totals: dict = {}
        for micro, batch in enumerate(batches):
            last = micro == n - 1
            sync = self.forward_model.no_sync() if self.distributed and not last else nullcontext()
            with sync:
                with autocast(self.device, cfg.precision):
                    loss, metrics = self.loss_fn(self.forward_model, batch)
                (loss / n if n > 1 else loss).backward()
            for k, v in metrics.items():
                v = v / n if n > 1 else v
                totals[k] = totals[k] + v if k in totals else v
        if cfg.grad_clip is not None:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals


@torch.no_grad()
def held_out_loss(model, batches, device, precision) -> tuple[float, list[float]]:
    """Mean cross-entropy over fixed held-out batches, and the per-batch values (for noise estimates)."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, precision):
            losses.append(model(x.to(device), y.to(device)).ce_loss)
    model.train(was_training)
    values = torch.stack(losses).float().tolist()  # one read of the device for all batches
    return sum(values) / len(values), values
