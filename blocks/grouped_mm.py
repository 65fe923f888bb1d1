"""Grouped matmul for Mixture-of-Experts: rows sorted by expert, one weight matrix per expert.

`grouped_mm(x, w, offsets)`: x (rows, d_in) sorted by expert, w (n_experts, d_in, d_out), offsets
(n_experts,) int32, the cumulative row counts (offsets[-1] == rows); rows offsets[e-1]:offsets[e] are
multiplied by w[e]. Shapes depend only on (rows, n_experts, widths), never on the routing.

It is a torch custom op with a fake implementation, an autograd formula and a FLOP formula, so the
memory estimate (FakeTensorMode), torch.compile and FlopCounterMode see through it in every dtype
(torch's own `_grouped_mm` has a meta implementation for bf16 only and no FLOP formula). Inside, the
kernel is chosen per call from static properties (`kernel_for`): torch's grouped GEMM where it runs
(CPU: fp32, bf16 or fp16; CUDA: bf16 on SM >= 80; widths and pointers 16-byte aligned), else a loop of
one matmul per expert, which reads the offsets on the host (a device sync: the price of the fallback,
e.g. for float64).
The weight gradient is one (n_experts, d_in, d_out) tensor, never per-expert slices of the parameter.
"""

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

KERNELS = ("auto", "grouped_mm", "loop")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: torch.Tensor) -> bool:
    """torch's grouped GEMM needs 16-byte aligned pointers and leading strides."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[-2:] if s != 1)


def _device_ok(a: torch.Tensor) -> bool:
    if a.device.type == "cpu":
        return a.dtype in _GROUPED_DTYPES
    # CUDA: the documented kernel is bf16 on SM >= 80; anything else gains nothing over the loop
    return a.device.type == "cuda" and a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)


def kernel_for(a: torch.Tensor, b: torch.Tensor) -> str:
    """'grouped_mm' where torch's grouped GEMM takes these operands, else 'loop'."""
    ok = hasattr(F, "grouped_mm") and _device_ok(a) and a.dtype == b.dtype and _aligned(a) and _aligned(b)
    return "grouped_mm" if ok else "loop"


def _bounds(offsets: torch.Tensor) -> list[int]:
    return [0, *offsets.tolist()]


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")


@torch.library.custom_op("micro_arch::moe_grouped_mm", mutates_args=())
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, kernel: str) -> torch.Tensor:
    """(rows, d_in) x (n_experts, d_in, d_out) -> (rows, d_out), rows grouped by `offsets`."""
    _check_kernel(kernel)
    if kernel == "grouped_mm" or (kernel == "auto" and kernel_for(x, w) == "grouped_mm"):
        return F.grouped_mm(x, w, offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[-1])
    bounds = _bounds(offsets)
    for e in range(w.shape[0]):
        torch.mm(x[bounds[e]:bounds[e + 1]], w[e], out=out[bounds[e]:bounds[e + 1]])
    return out


@grouped_mm_op.register_fake
def _(x, w, offsets, kernel):
    torch._check(x.shape[-1] == w.shape[1], lambda: f"grouped_mm: rows of width {x.shape[-1]} for weights "
                                                   f"of shape {tuple(w.shape)}")
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("micro_arch::moe_grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, kernel: str) -> torch.Tensor:
    """Weight gradient of grouped_mm: out[e] = x[group e]^T @ grad[group e], (n_experts, d_in, d_out)."""
    _check_kernel(kernel)
    xt = x.t()
    if kernel == "grouped_mm" or (kernel == "auto" and kernel_for(xt, grad) == "grouped_mm"):
        return F.grouped_mm(xt, grad, offs=offsets)
    out = x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])
    bounds = _bounds(offsets)
    for e in range(offsets.shape[0]):
        torch.mm(xt[:, bounds[e]:bounds[e + 1]], grad[bounds[e]:bounds[e + 1]], out=out[e])
    return out


@grouped_mm_wgrad.register_fake
def _(x, grad, offsets, kernel):
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output):
    x, w, offsets, kernel = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.kernel = kernel


def _backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the expanded gradient of a sum(): the GEMM needs real strides
    dx = grouped_mm_op(grad, w.transpose(1, 2), offsets, ctx.kernel) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_wgrad(x, grad, offsets, ctx.kernel) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.micro_arch.moe_grouped_mm)
def _grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


@register_flop_formula(torch.ops.micro_arch.moe_grouped_mm_wgrad)
def _wgrad_flops(x_shape, grad_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * grad_shape[1]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Rows of x sorted by expert times their expert's weight; see the module docstring.

    In plain eager execution with torch's kernel, torch's own grouped GEMM and its autograd run directly:
    the custom op's Python dispatch costs about 0.2 ms per projection forward and backward on a CPU. Under
    tracing (torch.compile, fake tensors) or a dispatch mode (FlopCounterMode) the custom op runs, with
    its fake implementation and FLOP formula."""
    _check_kernel(kernel)
    if kernel != "loop" and _plain_eager(x) and (kernel == "grouped_mm" or kernel_for(x, w) == "grouped_mm"):
        out = F.grouped_mm(x, w, offs=offsets)
        if out.requires_grad:  # torch's backward cannot take an expanded gradient (e.g. from a sum())
            out.register_hook(torch.Tensor.contiguous)
        return out
    return grouped_mm_op(x, w, offsets, kernel)


def _plain_eager(x: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or isinstance(x, FakeTensor) or _get_current_dispatch_mode() is not None)
