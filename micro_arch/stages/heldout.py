"""Held-out measurements of the later stages: assistant-token loss (SFT) and preference metrics (DPO)."""

from __future__ import annotations

import torch

from micro_arch.device import autocast

from .dpo_data import Pairs
from .losses import dpo_objective, sequence_logprobs, token_nats
from .sft_data import Examples, held_out_batches


@torch.no_grad()
def assistant_loss(model, examples: Examples, batch_size: int, device, precision: str = "fp32",
                   max_batches: int | None = None) -> dict:
    """Nats per assistant token over the held-out conversations (every one once, each token counted once)."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    try:
        for x, y in held_out_batches(examples, batch_size, max_batches):
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                logits = model(x).logits
            nats += float(token_nats(logits, y).sum())
            count += int((y >= 0).sum())
    finally:
        model.train(was_training)
    return {"assistant_loss": nats / max(count, 1), "assistant_tokens": count}


@torch.no_grad()
def pair_logprobs(model, pairs: Pairs, batch_size: int, device, precision: str = "fp32") -> tuple[torch.Tensor, ...]:
    """(chosen, rejected) summed answer log-probabilities of every pair, on the CPU."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            index = torch.arange(start, min(start + batch_size, len(pairs)))
            x, y = pairs.rows(index)
            with autocast(device, precision):
                logps = sequence_logprobs(model(x.to(device)).logits, y.to(device)).float().cpu()
            chosen.append(logps[: len(index)])
            rejected.append(logps[len(index):])
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(policy, pairs: Pairs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                       batch_size: int, device, precision: str = "fp32") -> dict:
    """DPO metrics of `policy` on `pairs` against the reference's log-probabilities, plus the likelihood
    accuracy (the share of pairs where the policy itself gives the chosen answer the higher log-probability),
    which is defined for any model, the reference included."""
    chosen, rejected = pair_logprobs(policy, pairs, batch_size, device, precision)
    loss, metrics = dpo_objective(chosen, rejected, ref_chosen, ref_rejected, beta)
    out = {"dpo_loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
    out["likelihood_accuracy"] = float((chosen > rejected).float().mean())
    out["pairs"] = len(pairs)
    return out
