"""Static-shape MoE dispatch: sort token-expert assignments by expert, on the device, no host reads.

Every tensor here has a shape fixed by (tokens, top_k, n_experts): counts come from a scatter_add_,
offsets from a cumulative sum, and capacity is a mask (an assignment past its expert's capacity keeps
its row but gets gate 0) rather than a removal of rows. So the fake-tensor memory estimate and
torch.compile trace it, and nothing waits for the device.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    tokens: torch.Tensor  # (A,) the token of each assignment in expert order (A = tokens * top_k)
    inverse: torch.Tensor  # (A,) where each slot-major assignment (slot * tokens + token) sits in expert order
    offsets: torch.Tensor  # (n_experts,) int32 cumulative assignments per expert, for grouped_mm
    counts: torch.Tensor  # (n_experts,) assignments per expert, before capacity
    kept: torch.Tensor | None  # (top_k, tokens) bool: within its expert's capacity; None without a capacity


def dispatch(chosen: torch.Tensor, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Plan for chosen (tokens, top_k) expert ids. Assignments are numbered slot-major (every token's
    first choice, then every second choice ...), so a stable sort by expert queues each expert's
    assignments in capacity priority: first choices before second choices, then token order."""
    n_tokens, top_k = chosen.shape
    expert_ids = chosen.t().reshape(-1)
    order = expert_ids.argsort(stable=True)
    position = torch.arange(order.numel(), device=chosen.device)
    inverse = torch.empty_like(order).scatter_(0, order, position)
    counts = torch.zeros(n_experts, dtype=torch.long, device=chosen.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    ends = counts.cumsum(0)
    kept = None
    if capacity is not None:
        rank = inverse - (ends - counts)[expert_ids]  # place in its expert's queue
        kept = (rank < capacity).view(top_k, n_tokens)
    return Dispatch(order % n_tokens, inverse, ends.to(torch.int32), counts, kept)


def capacity_for(capacity_factor: float | None, n_assign: int, n_experts: int) -> int | None:
    """Assignments one expert takes at most: ceil(capacity_factor * assignments / n_experts)."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_assign / n_experts)
