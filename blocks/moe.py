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
before second choices, then token order; the rest are dropped (they contribute nothing: they keep
their row, with gate 0, so that every shape is static).

Execution: assignments are sorted by expert on the device (`moe_dispatch`), and each expert projection
is one grouped matmul over all experts (`grouped_mm`: torch's grouped GEMM, or a loop over experts
where that cannot run; `kernel` forces one). No host reads: the block traces under FakeTensorMode and
compiles to one graph.

Statistics (`moe/max_load`: busiest expert's share of assignments over the ideal 1/n_experts,
before capacity; `moe/dropped`: fraction of assignments dropped) are 0-d tensors, read by the
trainer at log time only; with several MoE layers the value is the maximum over layers (the worst).
"""

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from micro_arch.blocks.grouped_mm import KERNELS, grouped_mm
from micro_arch.blocks.moe_dispatch import capacity_for, dispatch
from micro_arch.errors import BlockArgumentError
from micro_arch.model.registry import register_block

EXPERTS = ("swiglu", "gelu")
ROUTERS = ("softmax", "sigmoid")
BALANCES = ("aux_loss", "bias")


def expert_width(d_model: int, expert: str) -> int:
    """Default hidden width: SwiGLU 8/3 * d_model rounded up to a multiple of 32 (as the dense
    swiglu block, so one expert has a dense MLP's parameters), GELU 4 * d_model."""
    if expert == "gelu":
        return 4 * d_model
    return 32 * math.ceil(int(8 * d_model / 3) / 32)


def activation(h: torch.Tensor, expert: str) -> torch.Tensor:
    """The expert's nonlinearity on its input projection: SwiGLU (h = [x W_gate | x W_up]) or GELU."""
    if expert == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def expert_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, expert: str) -> torch.Tensor:
    """One expert on rows x: SwiGLU (w_in = [W_gate | W_up], fused) or GELU."""
    return activation(x @ w_in, expert) @ w_out


def autocasting(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on (as nn.Linear would), else x's."""
    return torch.get_autocast_dtype(x.device.type) if autocasting(x.device.type) else x.dtype


class Router(nn.Linear):
    """The router's linear map, always in float32 or wider whatever the autocast or the weights' dtype
    (in bf16, near-ties of the expert choice flip). A module of its own, so `trace` shows its shapes."""

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        no_autocast = torch.autocast(x.device.type, enabled=False) if autocasting(x.device.type) else nullcontext()
        with no_autocast:  # autocast would run it in bf16
            return F.linear(x.to(dtype), self.weight.to(dtype))


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

    every_param_gets_grad = True  # experts are stacked parameters: one no token chose gets zeros, so DDP
    # need not search for unused parameters

    def __init__(self, d_model: int, d_ff: int | None = None, n_experts: int = 8, top_k: int = 2,
                 n_shared_experts: int = 0, expert: str = "swiglu", router: str = "softmax",
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001, balance: str = "aux_loss",
                 bias_update_rate: float = 0.001, capacity_factor: float | None = None,
                 dropout: float = 0.0, n_layers: int = 1, kernel: str = "auto"):
        super().__init__()
        for arg, value, allowed in (("expert", expert, EXPERTS), ("router", router, ROUTERS),
                                    ("balance", balance, BALANCES), ("kernel", kernel, KERNELS)):
            if value not in allowed:
                raise BlockArgumentError(f"{arg}={value!r} is not one of {', '.join(allowed)}", argument=arg)
        if n_experts < 1:
            raise BlockArgumentError(f"n_experts={n_experts} should be at least 1", argument="n_experts")
        if not 1 <= top_k <= n_experts:
            raise BlockArgumentError(f"need 1 <= top_k <= n_experts; got top_k={top_k}, n_experts={n_experts}",
                                     argument="top_k")
        if n_shared_experts < 0:
            raise BlockArgumentError(f"n_shared_experts={n_shared_experts} should be >= 0",
                                     argument="n_shared_experts")
        if d_ff is not None and d_ff < 1:
            raise BlockArgumentError(f"d_ff={d_ff} should be a positive width", argument="d_ff")
        if capacity_factor is not None and capacity_factor <= 0:
            raise BlockArgumentError(f"capacity_factor={capacity_factor} should be > 0 (or unset for no limit)",
                                     argument="capacity_factor")
        for arg, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef),
                           ("bias_update_rate", bias_update_rate)):
            if value < 0:
                raise BlockArgumentError(f"{arg}={value} should be >= 0", argument=arg)
        self.n_experts, self.top_k, self.expert, self.router_kind = n_experts, top_k, expert, router
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.balance, self.bias_update_rate, self.capacity_factor = balance, bias_update_rate, capacity_factor
        self.n_layers, self.kernel = n_layers, kernel
        self.hidden = d_ff or expert_width(d_model, expert)
        n_in = self.hidden * (2 if expert == "swiglu" else 1)
        self.router = Router(d_model, n_experts, bias=False)
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

    def route(self, x: torch.Tensor) -> "Routing":
        """Router logits and scores (N, E), chosen experts and their gates (N, k), and for the softmax
        router the log-partition (N, 1), which gives both the scores and the z-loss."""
        logits = self.router(x)
        lse = None
        if self.router_kind == "softmax":
            lse = logits.logsumexp(-1, keepdim=True)
            scores = (logits - lse).exp()
        else:
            scores = logits.sigmoid()
        select = scores + self.expert_bias if self.balance == "bias" else scores
        chosen = select.topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return Routing(logits, scores, chosen, gates, lse)

    def forward(self, x, state=None):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n_tokens = flat.shape[0]
        n_assign = n_tokens * self.top_k
        routing = self.route(flat)
        chosen, gates = routing.chosen, routing.gates
        plan = dispatch(chosen, self.n_experts, capacity_for(self.capacity_factor, n_assign, self.n_experts))
        gates = gates.t().contiguous()  # (top_k, tokens), slot-major like the plan
        if plan.kept is not None:
            gates = gates * plan.kept  # dropped assignments still run, with gate 0 (static shapes)

        dtype = compute_dtype(flat)
        rows = flat.index_select(0, plan.tokens).to(dtype)
        h = grouped_mm(rows, self.w_in.to(dtype), plan.offsets, self.kernel)
        h = activation(h, self.expert)
        routed = grouped_mm(h, self.w_out.to(dtype), plan.offsets, self.kernel)
        routed = routed.index_select(0, plan.inverse).reshape(self.top_k, n_tokens, -1)
        out = (routed * gates.unsqueeze(-1)).sum(0).to(flat.dtype)
        if self.shared is not None:
            out = out + self.shared(flat)

        self.last_load = plan.counts.detach()
        if self.training and self.balance == "bias" and torch.is_grad_enabled():
            self._update_bias(plan.counts)
        if state is not None:
            self._report(state, routing, plan, rows, n_assign)
        return self.dropout(out.view(shape))

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, 2 per multiply-add with a weight: the router (d_model x n_experts),
        top_k experts' w_in and w_out, and the shared experts. Assignments that capacity drops still
        run (their gate is 0), so they count. Elementwise work (activation, gates, sorting) does not
        count, as for every other block. `seq_len` plays no part."""
        _, d_model, n_in = self.w_in.shape
        per_expert = d_model * n_in + self.hidden * d_model
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        return 2.0 * (self.router.weight.numel() + self.top_k * per_expert + shared)

    @torch.no_grad()
    def _update_bias(self, counts: torch.Tensor) -> None:
        load = counts.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank must move its copy of the bias the same way
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def _report(self, state, routing: "Routing", plan, rows, n_assign) -> None:
        """Trace records, losses, and the statistics as tensors (read by the trainer at log time only)."""
        state.record("router_logits", routing.logits)
        state.record("expert_load", plan.counts)
        state.record("expert_in", rows)  # every assignment's row, sorted by expert
        if self.training:
            if self.aux_loss_coef > 0 and self.balance == "aux_loss":
                scores = routing.scores  # softmax rows already sum to 1; sigmoid scores are normalised here
                probs = scores if self.router_kind == "softmax" else scores / scores.sum(-1, keepdim=True)
                state.add_aux_loss("moe_balance", self.aux_loss_coef * switch_loss(probs, plan.counts, n_assign))
            if self.z_loss_coef > 0:
                lse = routing.lse if routing.lse is not None else routing.logits.logsumexp(-1, keepdim=True)
                state.add_aux_loss("moe_z", self.z_loss_coef * lse.pow(2).mean())
        with torch.no_grad():
            max_load = plan.counts.max() * (self.n_experts / n_assign)
            dropped = (1.0 - plan.kept.float().mean()) if plan.kept is not None else torch.zeros_like(max_load,
                                                                                                    dtype=torch.float32)
        for name, value in (("moe/max_load", max_load.float()), ("moe/dropped", dropped)):
            state.stats[name] = torch.maximum(state.stats[name], value) if name in state.stats else value


def switch_loss(probs: torch.Tensor, counts: torch.Tensor, n_assign: int) -> torch.Tensor:
    """Switch Transformer balance loss n_experts * sum_i f_i * P_i: f_i the fraction of assignments
    routed to expert i (before capacity), P_i its mean router probability (`probs` rows sum to 1:
    sigmoid scores are normalised over all experts first). Equals 1 under uniform routing."""
    return probs.shape[-1] / n_assign * torch.dot(counts.to(probs.dtype), probs.mean(0))


class Routing(NamedTuple):
    logits: torch.Tensor
    scores: torch.Tensor
    chosen: torch.Tensor
    gates: torch.Tensor
    lse: torch.Tensor | None  # softmax router only
