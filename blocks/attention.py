"""Causal self-attention: MHA, GQA and MQA through n_kv_heads, RoPE, sliding window, QK-norm, KV cache."""

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import nn

from micro_arch.blocks.norms import rms_norm
from micro_arch.errors import BlockArgumentError
from micro_arch.model.registry import register_block


def rope_tables(head_dim: int, max_seq_len: int, theta: float, scaling: float = 1.0) -> torch.Tensor:
    """Rotations e^(i * position * theta^(-2j/d)) of shape (max_seq_len, head_dim // 2), complex.
    scaling > 1 is position interpolation (Chen et al., 2023): position p turns as p / scaling did, so a
    context `scaling` times longer spans the angles the model was trained on."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32) / scaling, inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., 2j], x[..., 2j+1]) of x by its position's angle; `rotations` holds the
    (cos, sin) of each angle in its last dimension and broadcasts against x's pairs.

    Eager: one complex multiply (half the kernels of the rotate-half form). Compiled: the same product
    written out in real numbers, because Inductor generates no code for complex tensors and would run
    the rotation outside its fused kernels."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        a, b = pairs.unbind(-1)
        cos, sin = rotations.float().unbind(-1)
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), -1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotations.float()))
    return rotated.flatten(-2).to(x.dtype)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (q, k) mask, True where query may attend: k <= q, and within `window` tokens if set."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def attended_keys_per_query(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to in a causal sequence of seq_len tokens: t + 1 at
    position t, at most `window`."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


@register_block("attention", kind="attention")
class Attention(nn.Module):
    """Causal multi-head self-attention through F.scaled_dot_product_attention; n_kv_heads < n_heads is GQA/MQA."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        max_seq_len: int = 1024,
        positions: str = "rope",
        rope_theta: float = 10000.0,
        rope_scaling: float = 1.0,
        window: Annotated[int | None, Ge(1)] = None,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        head_dim = head_dim or d_model // n_heads
        if n_heads % n_kv_heads:
            raise BlockArgumentError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}",
                                     argument="n_kv_heads")
        if positions == "rope" and head_dim % 2:
            raise BlockArgumentError(f"RoPE needs an even head_dim, got {head_dim}", argument="head_dim")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.qk_norm, self.dropout = window, qk_norm, dropout
        self.use_rope = positions == "rope"
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        if qk_norm:
            self.q_norm = nn.Parameter(torch.ones(head_dim))
            self.k_norm = nn.Parameter(torch.ones(head_dim))
        if self.use_rope:
            # kept as real (cos, sin) pairs: Module.to(dtype) would drop the imaginary part of a complex buffer
            rope = torch.view_as_real(rope_tables(head_dim, max_seq_len, rope_theta, rope_scaling))
            self.register_buffer("rope", rope, persistent=False)

    def forward_flops_per_token(self, seq_len: int) -> float:
        """2 x each projection weight, and QK^T and AV over the keys the causal (or sliding-window) mask allows
        each query: the work of a kernel that skips masked blocks."""
        weights = sum(p.numel() for p in self.parameters() if p.dim() >= 2)
        keys = attended_keys_per_query(seq_len, self.window)
        return 2.0 * weights + 2 * 2 * self.n_heads * self.head_dim * keys

    def forward(self, x, state=None):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, D)
        qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV:]
        if self.qk_norm:
            qk = torch.cat([rms_norm(qk[:, :, :H], self.q_norm, 1e-6), rms_norm(qk[:, :, H:], self.k_norm, 1e-6)], 2)
        if self.use_rope:  # q and k rotated together: one set of kernels instead of two
            offset = state.offset if state is not None else 0
            pos = slice(offset, offset + T)
            qk = apply_rope(qk, self.rope[pos, None])
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)
        cache = state.cache if state is not None else None
        if cache is not None:
            if self in cache:
                k = torch.cat([cache[self][0], k], dim=2)
                v = torch.cat([cache[self][1], v], dim=2)
            cache[self] = (k, v)
        S = k.shape[2]
        mask, is_causal = None, False
        if self.window is None and S == T:
            is_causal = T > 1
        elif self.window is not None or T > 1:
            q_pos = torch.arange(S - T, S, device=x.device)
            mask = causal_mask(q_pos, torch.arange(S, device=x.device), self.window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=KV != H,
        )
        if state is not None and state.recorder is not None:
            for name, t in (("q", q), ("k", k), ("v", v)):
                state.record(name, t)
            state.record("scores (inside SDPA)", torch.empty(B, H, T, S, device="meta"))
            state.record("attn_out", y)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.resid_dropout(self.out_proj(y))
