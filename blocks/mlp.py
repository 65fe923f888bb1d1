"""Feed-forward blocks: the GELU MLP of GPT-2 and the SwiGLU MLP of Llama."""

import torch.nn.functional as F
from torch import nn

from micro_arch.model.registry import register_block


def swiglu_width(d_model: int, multiple_of: int = 32) -> int:
    """Llama's hidden width: 8/3 of d_model (same parameters as a 4x GELU MLP), rounded up."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@register_block("gelu_mlp", kind="mlp")
class GeluMLP(nn.Module):
    """Linear -> GELU -> Linear, hidden width d_ff (default 4 * d_model)."""

    def __init__(self, d_model: int, d_ff: int | None = None, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        hidden = d_ff or 4 * d_model
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, state=None):
        return self.dropout(self.out_proj(F.gelu(self.up_proj(x))))


@register_block("swiglu", kind="mlp")
class SwiGLU(nn.Module):
    """SiLU-gated MLP: out_proj(silu(x W_gate) * x W_up), hidden width d_ff (default 8/3 * d_model)."""

    def __init__(self, d_model: int, d_ff: int | None = None, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.hidden = d_ff or swiglu_width(d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.hidden, bias=bias)  # gate and up, fused
        self.out_proj = nn.Linear(self.hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, state=None):
        gate, up = self.in_proj(x).chunk(2, dim=-1)
        return self.dropout(self.out_proj(F.silu(gate) * up))
