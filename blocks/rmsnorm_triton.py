"""RMSNorm with fused Triton forward and backward kernels, wrapped as a torch custom op.

Same maths as `blocks.norms.rms_norm` (float32 inside, output in the input's dtype). The kernels run
on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter, used by the
tests); anywhere else, or without triton installed, the block falls back to the plain `rms_norm`.
Design after Liger-Kernel's rms_norm: one program per row forward, caching the row's inverse RMS;
backward in a fixed number of programs that each sum their rows' weight gradient in float32.
"""

import os

import torch
from torch import nn

from blocks.norms import rms_norm
from micro_arch.registry import register_block

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the block always falls back
    triton = None

# triton.jit decides at decoration time whether to build interpreted kernels, so remember what it saw.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_WIDTH = 65536  # one row must fit in one block

if triton is not None:

    @triton.jit
    def _fwd_kernel(X, W, Y, RSTD, n_cols, eps, BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, rows_per_program,
                    BLOCK_SIZE: tl.constexpr):
        # dx = rstd * (dy*w - x * rstd^2 * mean(dy*w*x));  dw = sum over rows of dy * x * rstd
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * rows_per_program  # int64 so row * n_cols cannot overflow
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        end = tl.minimum(start + rows_per_program, n_rows)
        for row in range(start, end):
            offs = row * n_cols + cols
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            dyw = dy * w
            dx = rstd * (dyw - x * (rstd * rstd * tl.sum(dyw * x, axis=0) / n_cols))
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x * rstd
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _settings(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def _use_kernels(x: torch.Tensor) -> bool:
    if triton is None or x.shape[-1] > MAX_WIDTH:
        return False
    if _INTERPRETED:
        return os.environ.get("TRITON_INTERPRET") == "1"
    return x.is_cuda


def _reference_fwd(x, weight, eps):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[..., None] * weight.float()).to(x.dtype).contiguous(), rstd


def _check_weight(x, weight):
    torch._check(weight.shape == (x.shape[-1],),
                 lambda: f"rmsnorm: weight of shape {tuple(weight.shape)} for inputs of width {x.shape[-1]}")


@torch.library.custom_op("micro_arch::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension; returns (y, rstd) with rstd = 1/RMS per row in float32."""
    _check_weight(x, weight)
    if not _use_kernels(x):
        return _reference_fwd(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        block, warps = _settings(n_cols)
        _fwd_kernel[(n_rows,)](x2, weight.contiguous(), y, rstd, n_cols, eps, BLOCK_SIZE=block, num_warps=warps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@rmsnorm_fwd.register_fake
def _(x, weight, eps):
    _check_weight(x, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _n_programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        n = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n = 4  # the interpreter: few programs keep the partial sums small
    return max(1, min(n, n_rows))


@torch.library.custom_op("micro_arch::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight) of rmsnorm_fwd given dy and the saved rstd; dweight in weight's dtype."""
    if not _use_kernels(x):
        xhat = x.float() * rstd[..., None]
        dyw = dy.float() * weight.float()
        dx = rstd[..., None] * (dyw - xhat * (dyw * xhat).mean(-1, keepdim=True))
        dw = (dy.float() * xhat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype).contiguous(), dw.to(weight.dtype)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    n_prog = _n_programs(x.device, n_rows)
    partial = torch.zeros(n_prog, n_cols, dtype=torch.float32, device=x.device)
    if n_rows:
        block, warps = _settings(n_cols)
        _bwd_kernel[(n_prog,)](dy2, x2, weight.contiguous(), rstd.contiguous(), dx, partial, n_rows, n_cols,
                               triton.cdiv(n_rows, n_prog), BLOCK_SIZE=block, num_warps=warps)
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rmsnorm_bwd(dy, x, weight, rstd)
    return dx, dw, None


rmsnorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` through the Triton kernels where they can run, else the plain version."""
    if not _use_kernels(x):
        return rms_norm(x, weight, eps)
    return rmsnorm_fwd(x, weight, eps)[0]


@register_block("rmsnorm_triton", kind="norm")
class RMSNormTriton(nn.Module):
    """RMSNorm with fused Triton kernels (falls back to plain RMSNorm where Triton cannot run)."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x, state=None):
        return rms_norm_triton(x, self.weight, self.eps)
