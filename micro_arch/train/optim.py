"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from micro_arch.config import TrainConfig
from micro_arch.train.muon import Muon

NS_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}  # None: per device


def _split_params(model: nn.Module):
    """(matrices, others, embeddings and head): weight decay goes on matrices only."""
    seen, matrices, others, io = set(), [], [], []
    embed_like = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)
    if head is not None:
        embed_like.add(id(head.weight))
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_like:
            io.append(p)
        elif p.dim() >= 2 and not getattr(p, "_no_weight_decay", False):  # e.g. Mamba's A_log opts out
            matrices.append(p)
        else:
            others.append(p)
    return matrices, others, io


class CombinedOptimizer:
    """Several optimizers stepped together, with one state_dict (Muon for hidden matrices + AdamW)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    matrices, others, io = _split_params(model)
    # Fused AdamW: one kernel for all parameters, on CPU as on GPU.
    adamw = dict(betas=tuple(cfg.betas), eps=cfg.eps, fused=device.type in ("cpu", "cuda"))
    if cfg.optimizer == "adamw":
        groups = [
            {"params": matrices + [p for p in io if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": others + [p for p in io if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, **adamw)
        for g in opt.param_groups:
            g["base_lr"] = cfg.lr
        return CombinedOptimizer([opt])
    # Muon orthogonalises the updates of hidden 2-D weights; embeddings, head, norms and
    # n-D expert stacks stay with AdamW, as in the Muon paper.
    hidden_2d = [p for p in matrices if p.dim() == 2]
    rest = [p for p in matrices if p.dim() != 2] + io
    if not hidden_2d:
        return build_optimizer(model, dataclasses.replace(cfg, optimizer="adamw"), device)
    muon = Muon(hidden_2d, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                weight_decay=cfg.weight_decay, ns_steps=cfg.muon_ns_steps,
                ns_dtype=NS_DTYPES[cfg.muon_ns_dtype])
    for g in muon.param_groups:
        g["base_lr"] = cfg.muon_lr
    groups = [{"params": rest, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}]
    adam = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, **adamw)
    for g in adam.param_groups:
        g["base_lr"] = cfg.lr
    return CombinedOptimizer([muon, adam])


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warmup, then the schedule.
    The floor is min_lr/lr, so every group decays to the same fraction of its base rate."""
    floor = cfg.min_lr / cfg.lr
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: flat, then linear decay to the floor over the last decay_fraction of steps
    decay_steps = max(1, int(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start) / decay_steps)


def set_lr(optimizer, factor: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[-1]["lr"]
