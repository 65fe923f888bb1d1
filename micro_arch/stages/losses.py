"""The per-batch losses of the later stages: SFT (assistant tokens only) and DPO (Rafailov et al., 2023).

Both are normalised so that N processes with DDP (which averages gradients over ranks) compute exactly the
gradient of one process holding the whole global batch: SFT divides its summed token losses by the number
of learned tokens in the global batch (not this rank's), DPO averages over pairs and every rank holds the
same number of pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nats(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows, seq) negative log-likelihood of each target; 0 where the target is -1."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.reshape(-1), ignore_index=-1,
                           reduction="none").view(y.shape)


def sequence_logprobs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows,) summed log-probability of each row's targets (the answer's tokens)."""
    return -token_nats(logits, y).sum(1)


def _model_metrics(out) -> dict:
    metrics = {f"aux/{k}": v.detach() for k, v in out.aux_losses.items()}
    metrics.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.stats.items()})
    return metrics


def with_aux(loss: torch.Tensor, out) -> torch.Tensor:
    return loss + sum(out.aux_losses.values()) if out.aux_losses else loss


def sft_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """batch = (x, y, scale) with scale = world_size / (learned tokens in the global batch): the mean
    cross-entropy over the assistant tokens of the global batch (targets of -1 are not learned)."""
    x, y, scale = batch
    out = model(x)
    ce = token_nats(out.logits, y).sum() * scale
    return with_aux(ce, out), {"train_loss": ce.detach(), **_model_metrics(out)}


def dpo_objective(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """DPO loss -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs, and its metrics:
    the implicit rewards beta * (pi - ref), their margin, and preference accuracy (chosen reward higher)."""
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    margin = reward_chosen - reward_rejected
    loss = -F.logsigmoid(margin).mean()
    metrics = {"reward_margin": margin.detach().mean(),
               "preference_accuracy": (margin.detach() > 0).float().mean(),
               "reward_chosen": reward_chosen.detach().mean(), "reward_rejected": reward_rejected.detach().mean(),
               "logp_chosen": policy_chosen.detach().mean(), "logp_rejected": policy_rejected.detach().mean()}
    return loss, metrics


@torch.no_grad()
def reference_logprobs(reference, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The frozen reference model's summed answer log-probabilities (it stays in eval mode, without grad)."""
    return sequence_logprobs(reference(x).logits, y)


def dpo_loss_fn(reference, beta: float):
    """The DPO stage's loss_fn(model, batch), batch = (x, y, ref_logps): the chosen rows then the rejected rows
    (Pairs.rows), and the reference's log-probabilities of them, or None to compute them here."""

    def dpo_loss(model, batch) -> tuple[torch.Tensor, dict]:
        x, y, ref_logps = batch
        if ref_logps is None:
            ref_logps = reference_logprobs(reference, x, y)
        out = model(x)
        logps = sequence_logprobs(out.logits, y)
        n = len(x) // 2
        loss, metrics = dpo_objective(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
        return with_aux(loss, out), {"train_loss": loss.detach(), **{f"dpo/{k}": v for k, v in metrics.items()},
                                     **_model_metrics(out)}

    return dpo_loss
