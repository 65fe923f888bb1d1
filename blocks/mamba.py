"""Mamba-1 selective state-space mixer (Gu & Dao, 2023) in plain PyTorch, with a recurrent cache.

The selective scan h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t, y_t = C_t . h_t runs either as
a reference loop over time ("sequential") or chunked ("chunked"): the sequence is cut into chunks
that all advance together, chunk_size steps from a zero state, then a loop over chunks carries the
state across their boundaries and a second pass of chunk_size steps reads y out from the true
states. That is about 2 * chunk_size + seq / chunk_size steps on (batch, chunks, d_inner, d_state)
slices instead of seq steps on (batch, d_inner, d_state) ones. Memory is a few tensors of size
(batch, seq, d_inner, d_state), as the loop's autograd keeps: no chunk_size x chunk_size decay
matrices (Mamba-2's segsum), which Mamba-1's per-channel A would make d_inner * d_state times larger.
Every exponent is dt * A <= 0, so nothing can overflow.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from micro_arch.registry import register_block

SCANS = ("chunked", "sequential")


def selective_scan_sequential(x, dt, A, B, C, h0=None):
    """Reference scan, one time step at a time. x, dt: (b, l, d); A: (d, n); B, C: (b, l, n);
    h0: (b, d, n) or None. Returns y (b, l, d) and the final state (b, d, n), in float32."""
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if h0 is None else h0.float()
    ys = []
    # unbind, not x[:, t]: its backward is one stack, where slicing in a loop would add up full-size grads
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(dt_t[:, :, None] * A) * h + (dt_t * x_t)[:, :, None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    return torch.stack(ys, dim=1), h


def selective_scan_chunked(x, dt, A, B, C, h0=None, chunk_size: int = 64):
    """Same contract as selective_scan_sequential, computed chunk-parallel (see the module docstring)."""
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    b, length, d = x.shape
    q = min(chunk_size, length)
    pad = -length % q
    if pad:  # dt = 0 on the padding: decay 1 and no input, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, dt, B, C))
    nc = (length + pad) // q
    dt, dtx = dt.view(b, nc, q, d), (dt * x).view(b, nc, q, d)
    B, C = B.view(b, nc, q, -1), C.view(b, nc, q, -1)

    # Pass 1: every chunk from a zero state, all chunks at once; each step works on (b, nc, d, n)
    # slices, which stay in cache, where precomputing exp(dt * A) for the whole sequence would not.
    # unbind rather than indexing [:, :, t]: its backward is one stack, not q full-size sums.
    decays, inputs, h_local = [], [], None
    for dt_t, dtx_t, B_t in zip(dt.unbind(2), dtx.unbind(2), B.unbind(2)):
        decays.append(torch.exp(dt_t[..., None] * A))
        inputs.append(dtx_t[..., None] * B_t[:, :, None, :])
        h_local = inputs[-1] if h_local is None else decays[-1] * h_local + inputs[-1]

    # Carry the state across chunk boundaries; A is constant in time, so a chunk's decay is
    # exp(A * sum of its dt), and the exponent is <= 0.
    chunk_decay = torch.exp(dt.sum(2)[..., None] * A)  # (b, nc, d, n)
    h = x.new_zeros(b, d, A.shape[1]) if h0 is None else h0.float()
    starts = []
    for decay_c, local_c in zip(chunk_decay.unbind(1), h_local.unbind(1)):
        starts.append(h)
        h = decay_c * h + local_c

    # Pass 2: the same steps again, now from the true start states, reading out y_t = C_t . h_t.
    h_chunks, ys = torch.stack(starts, dim=1), []
    for decay_t, input_t, C_t in zip(decays, inputs, C.unbind(2)):
        h_chunks = decay_t * h_chunks + input_t
        ys.append(torch.einsum("bcdn,bcn->bcd", h_chunks, C_t))
    return torch.stack(ys, dim=2).reshape(b, nc * q, d)[:, :length], h


@register_block("mamba", kind="ssm")
class Mamba(nn.Module):
    """Mamba-1 selective SSM mixer: gated, conv-fed, input-dependent (dt, B, C) diagonal state space."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        scan: str = "chunked",
        chunk_size: int = 64,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                            ("expand", expand), ("dt_rank", dt_rank), ("chunk_size", chunk_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {', '.join(SCANS)}, got {scan!r}")
        self.d_inner = expand * d_model
        self.d_state, self.d_conv, self.dt_rank = d_state, d_conv, dt_rank
        self.dt_min, self.dt_max = dt_min, dt_max
        self.scan, self.chunk_size = scan, chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # Mamba's convention
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Mamba's inits: S4D-real A, D = 1, dt_proj so that softplus(bias) is log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_min, log_max = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_max - log_min) + log_min).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def extra_repr(self):
        return (f"d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, dt_rank={self.dt_rank}, "
                f"scan={self.scan!r}")

    def forward_flops_per_token(self, seq_len: int) -> float:
        """2 per weight of the projections, the depthwise conv, and the scan's ~7 operations per state element
        (dt*A, exp, dt*x*B, decay*h, +input, C.h multiply-add); A_log and D are no matmul weights."""
        linears = (self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
        return 2 * sum(m.weight.numel() for m in linears) + 2 * self.conv1d.weight.numel() + \
            7 * self.d_inner * self.d_state

    def _ssm_params(self, xc):
        """(dt, B, C) from the conv output: dt (..., d_inner) after softplus, B and C (..., d_state)."""
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, x, state=None):
        cache = state.cache if state is not None else None
        cached = cache.get(self) if cache is not None else None
        if cached is not None and x.shape[1] == 1:
            return self._step(x, state, cached)
        b, length, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = xs.transpose(1, 2)  # (b, d_inner, l): conv1d wants channels first
        k = self.d_conv - 1
        if cached is not None:  # several new tokens after earlier ones: continue from the cache
            conv_in = torch.cat([cached[0].to(xs.dtype), xs], dim=2)
            xc = F.conv1d(conv_in, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        else:
            conv_in = xs
            xc = self.conv1d(xs)[..., :length]  # causal: keep the first seq outputs of the padded conv
        xc = F.silu(xc).transpose(1, 2)  # (b, l, d_inner)
        dt, B, C = self._ssm_params(xc)
        A = -torch.exp(self.A_log.float())
        scan = selective_scan_chunked if self.scan == "chunked" else selective_scan_sequential
        kwargs = {"chunk_size": self.chunk_size} if self.scan == "chunked" else {}
        h0 = cached[1] if cached is not None else None
        y, h = scan(xc, dt, A, B, C, h0, **kwargs)
        y = (y + xc.float() * self.D.float()).to(x.dtype) * F.silu(z)
        if cache is not None:  # the last d_conv - 1 conv inputs, zeros before the first token
            cache[self] = (F.pad(conv_in, (k, 0))[..., conv_in.shape[2]:], h)
        if state is not None and state.recorder is not None:
            for name, t in (("x_conv", xc), ("z", z), ("dt", dt), ("B", B), ("C", C), ("A", A),
                            ("ssm_state", h), ("y", y)):
                state.record(name, t)
        return self.out_proj(y)

    def _step(self, x, state, cached):
        """One new token in O(1): slide the conv window by one, advance h by one step."""
        conv_state, h = cached
        xs, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (b, d_inner) each
        window = torch.cat([conv_state.to(xs.dtype), xs[:, :, None]], dim=2)  # (b, d_inner, d_conv)
        xc = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc)
        dt, B, C = self._ssm_params(xc)
        dt, B, C, xf = dt.float(), B.float(), C.float(), xc.float()
        A = -torch.exp(self.A_log.float())
        h = torch.exp(dt[:, :, None] * A) * h + (dt * xf)[:, :, None] * B[:, None, :]
        y = torch.einsum("bdn,bn->bd", h, C) + xf * self.D.float()
        y = y.to(x.dtype) * F.silu(z)
        state.cache[self] = (window[:, :, 1:], h)
        if state.recorder is not None:
            for name, t in (("x_conv", xc), ("dt", dt), ("B", B), ("C", C), ("ssm_state", h)):
                state.record(name, t)
        return self.out_proj(y[:, None])
