"""Normalisation blocks: RMSNorm and LayerNorm (with or without bias)."""

import torch
import torch.nn.functional as F
from torch import nn

from micro_arch.registry import register_block


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm, computed in float32 and cast back to the input's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # torch's fused kernel, same formula
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@register_block("rmsnorm", kind="norm")
class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (Zhang & Sennrich, 2019)."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x, state=None):
        return rms_norm(x, self.weight, self.eps)


@register_block("layernorm", kind="norm")
class LayerNorm(nn.Module):
    """LayerNorm with a learned scale and, unless bias=false, a learned shift."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x, state=None):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
