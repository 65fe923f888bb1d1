"""Muon: momentum, then each 2-D update replaced by its nearest semi-orthogonal matrix.

The orthogonalisation is the quintic Newton-Schulz iteration of Keller Jordan's Muon with a quintic of its
own for each step (Polar Express's coefficients, NS_COEFFICIENTS below), batched over parameters of the
same shape (one batched matmul per shape instead of one per parameter) and run
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

# One odd quintic x -> a x + b x^3 + c x^5 per step, each the minimax approximation of 1 on the interval
# the previous steps leave (the greedy schedule of Polar Express, Amsel et al. 2025), computed for
# singular values in [NS_FLOOR, 1] with a 1.01 safety margin against round-off; steps past the table repeat
# its last entry. After the default 4 steps every singular value that was >= NS_FLOOR after normalisation
# lies in NS_BAND (exact arithmetic; the tests check it, and that each entry is the minimax one): the same
# worst case as 5 steps of Keller Jordan's fixed quintic (3.4445, -4.7750, 2.0315), one step cheaper. In
# bf16 the steep first steps' round-off moves the smallest singular values further (down to about 0.5).
NS_COEFFICIENTS = (
    (8.343354, -24.202766, 17.594972),  # [0.002, 1] -> [0.017, 1.983]
    (4.072647, -2.970841, 0.547382),  # -> [0.068, 1.931]
    (3.687972, -2.705460, 0.518168),  # -> [0.250, 1.748]
    (2.780396, -2.039159, 0.445697),  # -> [0.663, 1.331]
    (1.990640, -1.358815, 0.375711),  # -> [0.972, 1.024]
)
NS_STEPS, NS_FLOOR, NS_BAND = 4, 2e-3, (0.66, 1.34)
RMS_MATCH = 0.2  # the RMS of a typical AdamW update, which Muon's update is scaled to
# Two iterations with one product by X cost 2 m^2 n + 5 m^3 multiply-adds (m the short side, n the long)
# against 4 m^2 n + 2 m^3: cheaper from n > 1.5 m; from 2 m the saving outweighs the extra small calls.
PAIR_RATIO = 2


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, on the last two dimensions (any leading batch dimensions).
    Singular values of the result lie in NS_BAND (after NS_STEPS steps) rather than at exactly 1."""
    return newton_schulz_many([g], steps, dtype)[0]


def newton_schulz_many(gs: list[torch.Tensor], steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """newton_schulz of each tensor, in lockstep: the Gram matrices of all tensors whose short side is
    the same are worked on in one batched call (for small matrices a call costs more than its arithmetic).

    One step is X <- p(G) X with p(G) = a I + b G + c G^2 and G = X X^T, the smaller Gram matrix; a tall X
    is kept in its own layout and iterated from the right, X <- X p(G)^T with G = X^T X: the same
    arithmetic without transposing X in memory. Where X is at least PAIR_RATIO times wider than tall, two
    steps share one product with X: p(G) commutes with G, so the next Gram matrix is p(G)^2 G, and
    X <- p(p(G)^2 G) p(G) X costs 5 small (short x short) products instead of 2 products with X."""
    xs = [_normalised(g, dtype) for g in gs]
    tall = [x.size(-2) > x.size(-1) for x in xs]
    groups = defaultdict(list)
    for i, x in enumerate(xs):
        short, long = sorted(x.shape[-2:])
        groups[(x.device, short, long >= PAIR_RATIO * short)].append(i)
    for (device, side, paired), idx in groups.items():
        sizes = [xs[i].size(0) for i in idx]
        done = 0
        while done < steps:
            grams = torch.empty(sum(sizes), side, side, dtype=dtype, device=device)
            for i, gram in zip(idx, grams.split(sizes)):
                left, right = (xs[i].mT, xs[i]) if tall[i] else (xs[i], xs[i].mT)
                torch.bmm(left, right, out=gram)
            pair = paired and steps - done >= 2
            polys = _quintic(grams, done)
            if pair:
                polys = torch.bmm(_quintic(torch.bmm(polys, torch.bmm(polys, grams)), done + 1), polys)
            done += 2 if pair else 1
            for i, poly in zip(idx, polys.split(sizes)):
                xs[i] = torch.bmm(xs[i], poly.mT) if tall[i] else torch.bmm(poly, xs[i])
    return [x.reshape(g.shape) for g, x in zip(gs, xs)]


def _quintic(gram: torch.Tensor, step: int) -> torch.Tensor:
    """a I + b G + c G^2 with step's coefficients, batched: the a I is added on the diagonal, so applying it
    is one plain product."""
    a, b, c = NS_COEFFICIENTS[min(step, len(NS_COEFFICIENTS) - 1)]
    poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
    poly.diagonal(dim1=-2, dim2=-1).add_(a)
    return poly


def _normalised(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g / |g|_F as a [batch, rows, cols] tensor of `dtype`. The Frobenius norm bounds the spectral norm,
    so every singular value lands in [0, 1]. Dividing into the output casts in the same pass."""
    g3 = g.reshape(-1, *g.shape[-2:])
    x = torch.empty(g3.shape, dtype=dtype, device=g.device)
    return torch.div(g3, torch.linalg.matrix_norm(g3, keepdim=True).add_(1e-7), out=x)


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
                 weight_decay: float = 0.0, ns_steps: int = NS_STEPS, ns_dtype: torch.dtype | None = None,
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
        self._stacks: dict[tuple[int, ...], torch.Tensor] = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("shard", True)
        self._stacks = {}  # load_state_dict comes here: the loaded buffers are stacked again on the next step

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
        m, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        shapes = _by_shape(params)
        directions = []
        for same in shapes:
            grads = torch.stack([p.grad for p in same])
            bufs = self._momentum_stack(same)
            bufs.lerp_(grads, 1 - m)
            directions.append(grads.lerp_(bufs, m) if group["nesterov"] else bufs)
        ns = dict(steps=group["ns_steps"], dtype=group["ns_dtype"] or default_ns_dtype(params[0].device))
        world = dist.get_world_size() if self.shard and dist.is_available() and dist.is_initialized() else 1
        updates = newton_schulz_many(directions, **ns) if world == 1 else _sharded(directions, world, ns)
        for same, update in zip(shapes, updates):
            if wd:
                torch._foreach_mul_(same, 1 - lr * wd)
            scale = -lr * update_scale(same[0].shape)
            for p, u in zip(same, update.unbind(0)):
                p.add_(u, alpha=scale)  # u may be bf16: add_ casts on the fly, no copy of the stack

    def _momentum_stack(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The momentum buffers of same-shaped parameters as one [k, rows, cols] tensor, so momentum is
        two ops per shape, not two per parameter. Each parameter's state["momentum_buffer"] is a view
        into it (checkpoints keep one buffer per parameter)."""
        key = tuple(id(p) for p in params)
        stack = self._stacks.get(key)
        if stack is None:
            olds = [self.state[p].get("momentum_buffer") for p in params]
            stack = torch.stack([torch.zeros_like(p) if b is None else b.to(p) for p, b in zip(params, olds)])
            for p, view in zip(params, stack.unbind(0)):
                self.state[p]["momentum_buffer"] = view
            # a cached stack that shares a parameter with this one no longer holds its buffer
            self._stacks = {k: s for k, s in self._stacks.items() if not set(k) & set(key)}
            self._stacks[key] = stack
        return stack


def _by_shape(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters grouped by (shape, device, dtype): each group is orthogonalised in one batched call."""
    groups = defaultdict(list)
    for p in params:
        groups[(p.shape, p.device, p.dtype)].append(p)
    return list(groups.values())


def _sharded(stacks: list[torch.Tensor], world: int, ns: dict) -> list[torch.Tensor]:
    """Rank r orthogonalises rows [r k, (r + 1) k) of each stack (zero-padded to world * k; Newton-Schulz
    of zero is zero) and all ranks gather everyone's rows."""
    rank, mine = dist.get_rank(), []
    for stack in stacks:
        k = -(-stack.size(0) // world)
        if stack.size(0) < world * k:
            stack = torch.cat([stack, stack.new_zeros(world * k - stack.size(0), *stack.shape[1:])])
        mine.append(stack[rank * k:(rank + 1) * k])
    out = []
    for n, part in zip([s.size(0) for s in stacks], newton_schulz_many(mine, **ns)):
        parts = [torch.empty_like(part, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        out.append(torch.cat(parts)[:n])
    return out
