"""RMSNorm with fused Triton forward and backward kernels, wrapped as a torch custom op.

Same maths as `micro_arch.blocks.norms.rms_norm` (float32 inside, output in the input's dtype). The kernels run
on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter, used by the
tests); anywhere else, or without triton installed, the block falls back to the plain `rms_norm`.
Design after Liger-Kernel's rms_norm: the forward caches each row's inverse RMS; the backward runs in one
program per multiprocessor, each summing its rows' weight gradient in float32 registers and writing one
partial row, reduced once at the end. Narrow rows go several to a program (one tile of ROWS x width), and
the rows per program and num_warps are autotuned per width over a few configs (Triton's autotune, cached
in the process and, on a GPU, on disk); under the interpreter the autotuner times one call per config.
"""

import os
import time
from typing import Annotated

import torch
from annotated_types import Gt
from torch import nn

from micro_arch.blocks.norms import rms_norm
from micro_arch.model.registry import register_block

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the block always falls back
    triton = None

# triton.jit decides at decoration time whether to build interpreted kernels, so remember what it saw.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_WIDTH = 65536  # one row must fit in one block
MAX_TILE = 8192  # elements one program holds per tile (rows x padded width) when it takes several rows

if triton is not None:

    @triton.jit
    def _fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, eps, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr):
        # ROWS rows per program: a narrow row alone leaves most of a program's threads idle
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: row * n_cols cannot overflow
        cols = tl.arange(0, BLOCK_SIZE)
        row_ok, col_ok = rows < n_rows, cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        tl.store(Y + offs, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, rows_per_program,
                    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr):
        # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), xhat = x*rstd;  dw = sum over rows of dy * xhat.
        # Each program walks its share of rows ROWS at a time and keeps its dw in registers; it writes one
        # partial row at the end (no atomics), and one reduction over the programs' partials finishes dw.
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * rows_per_program
        end = tl.minimum(start + rows_per_program, n_rows)
        cols = tl.arange(0, BLOCK_SIZE)
        col_ok = cols < n_cols
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((ROWS, BLOCK_SIZE), dtype=tl.float32)
        for first in range(start, end, ROWS):
            rows = first + tl.arange(0, ROWS)
            row_ok = rows < end
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None] * n_cols + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            dyw = dy * w[None, :]
            dx = rstd[:, None] * (dyw - xhat * (tl.sum(dyw * xhat, axis=1) / n_cols)[:, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


def _default_config(block: int) -> tuple[int, int]:
    """(rows per program or tile, num_warps) for a padded width, always among the autotuner's candidates.
    Narrow rows go together up to 2048 elements a tile; warps then give each thread 16 elements (what
    Liger-Kernel's warp heuristic gives at widths 4096 and 8192)."""
    rows = max(1, min(16, 2048 // block))
    return rows, min(32, max(4, rows * block // 512))


def _tile_ok(rows: int, warps: int, block: int) -> bool:
    """A tile of several rows stays within MAX_TILE elements (registers), and each thread holds 8-16
    elements (one or two 16-byte loads per tensor in bf16, two to four in fp32), up to 32 for a single
    wide row. Fewer leaves threads idle on memory latency; more spills registers."""
    tile = rows * block
    per_thread = tile // (32 * warps)
    return (rows == 1 or tile <= MAX_TILE) and 8 <= per_thread <= (32 if rows == 1 else 16)


CONFIG_SPACE = [(rows, warps) for rows in (1, 2, 4, 8, 16) for warps in (4, 8, 16, 32)]


def configs_for(block: int) -> list[tuple[int, int]]:
    """The (rows, num_warps) the autotuner tries for a padded width (the default one always among them)."""
    kept = [c for c in CONFIG_SPACE if _tile_ok(*c, block)]
    default = _default_config(block)
    return kept if default in kept else kept + [default]


def _prune(configs, named_args, **kwargs):
    keep = set(configs_for(kwargs["BLOCK_SIZE"]))
    return [c for c in configs if (c.kwargs["ROWS"], c.num_warps) in keep]


def _time_once(kernel_call, quantiles=None):
    """The interpreter's stand-in for Triton's benchmark (which needs a GPU): one call, wall-clock ms.
    It keeps the autotuning path exercised by the tests at the cost of one extra run per candidate."""
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


if triton is not None:
    # Each kernel is timed over the configs that suit a width the first time it meets that width (and
    # dtype); the winner is kept for the process and, on a GPU, on disk (Triton's autotune cache).
    def _autotuned(kernel):
        configs = [triton.Config({"ROWS": rows}, num_warps=warps) for rows, warps in CONFIG_SPACE]
        return triton.autotune(configs=configs, key=["n_cols"], prune_configs_by={"early_config_prune": _prune},
                               do_bench=_time_once if _INTERPRETED else None, cache_results=True)(kernel)

    _fwd_tuned, _bwd_tuned = _autotuned(_fwd_kernel), _autotuned(_bwd_kernel)


def _launch(kernel: str, grid, *args, block: int, config: tuple[int, int] | None = None):
    """Run the forward or backward kernel, autotuned, or with `config` = (rows, num_warps) if given.
    grid(rows) gives the launch grid for a number of rows per program."""
    if config is None:
        tuned = _fwd_tuned if kernel == "fwd" else _bwd_tuned
        tuned[lambda meta: grid(meta["ROWS"])](*args, BLOCK_SIZE=block)
        return
    rows, warps = config
    raw = _fwd_kernel if kernel == "fwd" else _bwd_kernel
    raw[grid(rows)](*args, BLOCK_SIZE=block, ROWS=rows, num_warps=warps)


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


def triton_fwd(x, weight, eps, config=None):
    """The forward kernels on (..., n) inputs; config = (rows, num_warps) forces one config (tests)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        _launch("fwd", lambda rows: (triton.cdiv(n_rows, rows),), x2, weight.contiguous(), y, rstd, n_rows,
                n_cols, eps, block=triton.next_power_of_2(n_cols), config=config)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@torch.library.custom_op("micro_arch::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension; returns (y, rstd) with rstd = 1/RMS per row in float32."""
    _check_weight(x, weight)
    if not _use_kernels(x):
        return _reference_fwd(x, weight, eps)
    return triton_fwd(x, weight, eps)


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


def triton_bwd(dy, x, weight, rstd, config=None):
    """The backward kernels: (dx, dweight); config = (rows, num_warps) forces one config (tests)."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    dy2 = dy.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    n_prog = _n_programs(x.device, n_rows)
    # every program writes its whole partial row (zeros if it got no rows): no memset needed
    partial = torch.empty(n_prog, n_cols, dtype=torch.float32, device=x.device)
    if not n_rows:
        partial.zero_()
    else:
        _launch("bwd", lambda rows: (n_prog,), dy2, x2, weight.contiguous(), rstd.contiguous(), dx, partial,
                n_rows, n_cols, triton.cdiv(n_rows, n_prog), block=triton.next_power_of_2(n_cols), config=config)
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


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
    return triton_bwd(dy, x, weight, rstd)


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

    def __init__(self, d_model: int, eps: Annotated[float, Gt(0)] = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x, state=None):
        return rms_norm_triton(x, self.weight, self.eps)
