"""Muon: momentum, then each 2-D update replaced by its nearest semi-orthogonal matrix.

The orthogonalisation is the quintic Newton-Schulz iteration of Keller Jordan's Muon, batched over
parameters of the same shape (one batched matmul per shape instead of one per parameter) and run
in the dtype that is fast on the device. Under torch.distributed every rank holds the same gradients
(DDP has averaged them), so each rank orthogonalises only its share of each shape's stack and the
results are all-gathered, instead of every rank repeating the whole computation.

Scale convention (AdamW-matching, as in Moonlight): the orthogonalised update O (all singular
values near 1) is multiplied by 0.2 * sqrt(max(rows, cols)), which brings its RMS to about 0.2, the
typical RMS of an AdamW update. So `lr` is on AdamW's scale, and decoupled weight decay
p <- p * (1 - lr * weight_decay) shrinks weights per step exactly as AdamW's does at the same lr.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

# The quintic's coefficients: x -> a x + b x^3 + c x^5 pushes every singular value in (0, 1] up
# fast without converging to 1: after 5 steps, every singular value that was >= QUINTIC_FLOOR after
# normalisation lands in QUINTIC_BAND (exact arithmetic; the tests check it), near enough for Muon.
QUINTIC = (3.4445, -4.7750, 2.0315)
QUINTIC_FLOOR, QUINTIC_BAND = 2e-3, (0.68, 1.21)
RMS_MATCH = 0.2  # the RMS of a typical AdamW update, which Muon's update is scaled to


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, on the last two dimensions (any leading batch dimensions).
    Singular values of the result lie in QUINTIC_BAND rather than at exactly 1."""
    a, b, c = QUINTIC
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the short side: X X^T is then the smaller Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1].
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if x.dim() == 3 else b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a) if x.dim() == 3 else a * x + poly @ x
    return x.mT if tall else x


def update_scale(shape: torch.Size) -> float:
    return RMS_MATCH * math.sqrt(max(shape[-2], shape[-1]))


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies bf16 matrices natively (GPUs; CPUs with AVX512-BF16 or AMX,
    where it is about 3x faster than fp32), fp32 on other CPUs, where bf16 matmuls are emulated."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return torch.bfloat16 if any(f() for f in native) else torch.float32
    return torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Momentum as in the reference: buf <- m buf + (1 - m) g, and with
    Nesterov the orthogonalised direction is g + m (buf - g); without, buf itself.

    ns_dtype: None picks per device (default_ns_dtype). shard: orthogonalise only this rank's share
    when torch.distributed is initialised with more than one process (parameters must then be the
    same on every rank, as under DDP)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None,
                 shard: bool = True):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"Muon: lr must be > 0 (got {lr}), momentum in [0, 1) (got {momentum}), "
                             f"weight_decay >= 0 (got {weight_decay}), ns_steps >= 1 (got {ns_steps})")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only; got one of shape {tuple(p.shape)} "
                                     "(give embeddings, norms and n-D weights to AdamW)")
        self.shard = shard

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("shard", True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        m = group["momentum"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - m)
        directions = torch._foreach_lerp(grads, bufs, m) if group["nesterov"] else bufs
        lr, wd = group["lr"], group["weight_decay"]
        for idx, updates in self._orthogonalised(directions, group):
            shared = [params[i] for i in idx]
            if wd:
                torch._foreach_mul_(shared, 1 - lr * wd)
            torch._foreach_add_(shared, updates.to(shared[0].dtype).unbind(0),
                                alpha=-lr * update_scale(shared[0].shape))

    def _orthogonalised(self, directions: list[torch.Tensor], group: dict):
        """(indices, their Newton-Schulz stack) for each (shape, device): one batched call each, sharded
        over ranks under torch.distributed."""
        dtype = group["ns_dtype"]
        by_shape = defaultdict(list)
        for i, d in enumerate(directions):
            by_shape[(tuple(d.shape), d.device)].append(i)
        world = dist.get_world_size() if self.shard and dist.is_available() and dist.is_initialized() else 1
        for (_, device), idx in by_shape.items():
            ns = dict(steps=group["ns_steps"], dtype=dtype or default_ns_dtype(device))
            stack = torch.stack([directions[i] for i in idx])
            yield idx, newton_schulz(stack, **ns) if world == 1 else _sharded(stack, world, ns)


def _sharded(stack: torch.Tensor, world: int, ns: dict) -> torch.Tensor:
    """Rank r orthogonalises rows [r k, (r + 1) k) of the stack (zero-padded to world * k; Newton-Schulz
    of zero is zero) and all ranks gather everyone's rows."""
    n = stack.size(0)
    k = -(-n // world)
    if n < world * k:
        stack = torch.cat([stack, stack.new_zeros(world * k - n, *stack.shape[1:])])
    rank = dist.get_rank()
    mine = newton_schulz(stack[rank * k:(rank + 1) * k], **ns).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat(parts)[:n]
