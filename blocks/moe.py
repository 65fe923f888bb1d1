"""Mixture-of-Experts feed-forward block: token-choice top-k routing over stacked SwiGLU/GELU experts.

Routing (router logits always in float32 or wider):
- softmax router: gates are the softmax probabilities of the chosen experts, renormalised to sum 1
  when top_k > 1 (Mixtral). With top_k = 1 the raw probability is kept (Switch Transformer): a
  renormalised single gate is constantly 1 and the router would then learn only from the auxiliary
  losses.
- sigmoid router: independent sigmoid scores, gates normalised to sum 1 over the chosen experts
  (DeepSeek-V3); again the raw score when top_k = 1.

Balancing: balance="aux_loss" adds the Switch load-balancing loss; balance="bias" adds a per-expert
bias to the scores used to *select* experts only (never to the gates), nudged after each training
forward by bias_update_rate * sign(mean load - load) (DeepSeek-V3's auxiliary-loss-free balancing).
The router z-loss is independent of both. With capacity_factor set, each expert takes at most
ceil(capacity_factor * tokens * top_k / n_experts) assignments; first choices of all tokens come
before second choices, then token order; the rest are dropped (they contribute nothing).

Statistics (`moe/max_load`: busiest expert's share of assignments over the ideal 1/n_experts,
before capacity; `moe/dropped`: fraction of assignments dropped): with several MoE layers the
logged value is the maximum over layers, i.e. the worst layer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from micro_arch.registry import register_block

EXPERTS = ("swiglu", "gelu")
ROUTERS = ("softmax", "sigmoid")
BALANCES = ("aux_loss", "bias")


def expert_width(d_model: int, expert: str) -> int:
    """Default hidden width: SwiGLU 8/3 * d_model rounded up to a multiple of 32 (as the dense
    swiglu block, so one expert has a dense MLP's parameters), GELU 4 * d_model."""
    if expert == "gelu":
        return 4 * d_model
    return 32 * math.ceil(int(8 * d_model / 3) / 32)


def expert_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, expert: str) -> torch.Tensor:
    """One expert on rows x: SwiGLU (w_in = [W_gate | W_up], fused) or GELU."""
    h = x @ w_in
    if expert == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ w_out


class SharedExperts(nn.Module):
    """The always-on experts, fused into one MLP of width n_shared * hidden (plain Linears, so the
    model's init scales `out_proj` like any residual output projection)."""

    def __init__(self, d_model: int, hidden: int, expert: str):
        super().__init__()
        self.expert = expert
        self.in_proj = nn.Linear(d_model, hidden * (2 if expert == "swiglu" else 1), bias=False)
        self.out_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return expert_mlp(x, self.in_proj.weight.t(), self.out_proj.weight.t(), self.expert)


@register_block("moe", kind="moe")
class MoE(nn.Module):
    """Mixture of Experts: top-k token routing over n_experts SwiGLU/GELU experts (+ optional shared)."""

    def __init__(self, d_model: int, d_ff: int | None = None, n_experts: int = 8, top_k: int = 2,
                 n_shared_experts: int = 0, expert: str = "swiglu", router: str = "softmax",
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001, balance: str = "aux_loss",
                 bias_update_rate: float = 0.001, capacity_factor: float | None = None,
                 dropout: float = 0.0, n_layers: int = 1):
        super().__init__()
        for arg, value, allowed in (("expert", expert, EXPERTS), ("router", router, ROUTERS),
                                    ("balance", balance, BALANCES)):
            if value not in allowed:
                raise ValueError(f"{arg}={value!r} is not one of {', '.join(allowed)}")
        if n_experts < 1 or not 1 <= top_k <= n_experts:
            raise ValueError(f"need n_experts >= 1 and 1 <= top_k <= n_experts; got n_experts={n_experts}, "
                             f"top_k={top_k}")
        if n_shared_experts < 0:
            raise ValueError(f"n_shared_experts={n_shared_experts} should be >= 0")
        if d_ff is not None and d_ff < 1:
            raise ValueError(f"d_ff={d_ff} should be a positive width")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} should be > 0 (or unset for no limit)")
        if aux_loss_coef < 0 or z_loss_coef < 0 or bias_update_rate < 0:
            raise ValueError("aux_loss_coef, z_loss_coef and bias_update_rate should be >= 0")
        self.n_experts, self.top_k, self.expert, self.router_kind = n_experts, top_k, expert, router
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.balance, self.bias_update_rate, self.capacity_factor = balance, bias_update_rate, capacity_factor
        self.n_layers = n_layers
        self.hidden = d_ff or expert_width(d_model, expert)
        n_in = self.hidden * (2 if expert == "swiglu" else 1)
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, n_in))
        self.w_out = nn.Parameter(torch.empty(n_experts, self.hidden, d_model))
        self.shared = SharedExperts(d_model, n_shared_experts * self.hidden, expert) if n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(n_experts))  # used by balance="bias" only
        self.dropout = nn.Dropout(dropout)
        self.last_load = torch.zeros(n_experts, dtype=torch.long)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.w_in, 0.0, 0.02)
        nn.init.normal_(self.w_out, 0.0, 0.02 / math.sqrt(2 * self.n_layers))

    def route(self, x: torch.Tensor):
        """Router logits (N, E), scores (N, E), chosen experts (N, k) and their gates (N, k)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        select = scores + self.expert_bias if self.balance == "bias" else scores
        chosen = select.topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return logits, scores, chosen, gates

    def forward(self, x, state=None):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n_tokens, n_assign = flat.shape[0], flat.shape[0] * self.top_k
        logits, scores, chosen, gates = self.route(flat)

        # Assignments slot-major (every token's first choice, then second ...), so a stable sort by
        # expert gives each expert its tokens in capacity priority order.
        expert_ids = chosen.t().reshape(-1)
        token_ids = torch.arange(n_tokens, device=x.device).repeat(self.top_k)
        gate_ids = gates.t().reshape(-1)
        order = expert_ids.argsort(stable=True)
        counts = torch.bincount(expert_ids, minlength=self.n_experts)
        kept = counts
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n_assign / self.n_experts)
            starts = counts.cumsum(0) - counts
            rank = torch.arange(n_assign, device=x.device) - starts[expert_ids[order]]
            order = order[rank < capacity]
            kept = counts.clamp(max=capacity)

        tokens = token_ids[order]
        chunks = flat[tokens].split(kept.tolist())
        outputs = [expert_mlp(chunk, self.w_in[e], self.w_out[e], self.expert)
                   for e, chunk in enumerate(chunks) if len(chunk)]
        out = torch.zeros_like(flat)
        if outputs:
            routed = torch.cat(outputs) * gate_ids[order].unsqueeze(-1)
            out.index_add_(0, tokens, routed.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)

        self.last_load = counts.detach()
        if self.training and self.balance == "bias" and torch.is_grad_enabled():
            self._update_bias(counts)
        if state is not None:
            busy = next((c for c in chunks if len(c)), chunks[0])  # expert 0 may get no tokens at all
            self._report(state, logits, scores, counts, kept, busy, n_assign)
        return self.dropout(out.view(shape))

    @torch.no_grad()
    def _update_bias(self, counts: torch.Tensor) -> None:
        load = counts.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank must move its copy of the bias the same way
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def _report(self, state, logits, scores, counts, kept, first_expert_in, n_assign) -> None:
        """Trace records (expert_in: the input of the first expert that got tokens), losses, stats."""
        state.record("router_logits", logits)
        state.record("expert_load", counts)
        state.record("expert_in", first_expert_in)
        if self.training:
            if self.aux_loss_coef > 0 and self.balance == "aux_loss":
                state.add_aux_loss("moe_balance", self.aux_loss_coef * switch_loss(scores, counts, n_assign))
            if self.z_loss_coef > 0:
                state.add_aux_loss("moe_z", self.z_loss_coef * torch.logsumexp(logits, -1).pow(2).mean())
        max_load = float(counts.max()) * self.n_experts / n_assign
        dropped = float((counts - kept).sum()) / n_assign
        for name, value in (("moe/max_load", max_load), ("moe/dropped", dropped)):
            state.stats[name] = max(value, state.stats.get(name, value))


def switch_loss(scores: torch.Tensor, counts: torch.Tensor, n_assign: int) -> torch.Tensor:
    """Switch Transformer balance loss n_experts * sum_i f_i * P_i: f_i the fraction of assignments
    routed to expert i (before capacity), P_i its mean router probability (sigmoid scores are
    normalised over all experts first). Equals 1 under uniform routing."""
    probs = scores / scores.sum(-1, keepdim=True)
    return scores.shape[-1] * (counts.to(probs.dtype) / n_assign * probs.mean(0)).sum()
