"""The Mamba block: the chunked and parallel scans against the sequential loop, recurrent generation, causality, bad input."""

import pytest
import torch

from micro_arch.blocks.mamba import (
    Mamba,
    selective_scan_chunked,
    selective_scan_parallel,
    selective_scan_sequential,
)
from micro_arch.errors import MicroArchError
from micro_arch.model.registry import Dims, build_block
from micro_arch.model.state import BlockState

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def reference_scan(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t, written out element by element in time."""
    b, length, d = x.shape
    h = torch.zeros(b, d, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(length):
        dA = torch.exp(dt[:, t].unsqueeze(-1) * A)
        dBx = dt[:, t].unsqueeze(-1) * B[:, t].unsqueeze(1) * x[:, t].unsqueeze(-1)
        h = dA * h + dBx
        ys.append((h * C[:, t].unsqueeze(1)).sum(-1))
    return torch.stack(ys, 1), h


def scan_inputs(b, length, d, n, seed=0, h0=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g) - 1)
    A = -torch.exp(torch.randn(d, n, generator=g))
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    state = torch.randn(b, d, n, generator=g) if h0 else None
    return x, dt, A, B, C, state


def close(a, b, rtol=1e-4):
    return (a - b).abs().max() <= rtol * b.abs().max().clamp(min=1e-6)


SCAN_VARIANTS = {
    "parallel": lambda *a: selective_scan_parallel(*a, block=32),
    "parallel-one-block": selective_scan_parallel,
    "chunked-4": lambda *a: selective_scan_chunked(*a, chunk_size=4, block=32),
    "chunked-16": lambda *a: selective_scan_chunked(*a, chunk_size=16, block=64),
}


@pytest.mark.parametrize("variant", list(SCAN_VARIANTS))
@pytest.mark.parametrize("b,length,d,n", [(2, 1, 8, 4), (2, 7, 8, 4), (2, 64, 8, 4), (1, 100, 16, 8),
                                          (3, 130, 12, 16), (2, 257, 8, 4)])
@pytest.mark.parametrize("h0", [False, True])
def test_fast_scans_match_reference_values_and_gradients(variant, b, length, d, n, h0):
    inputs = [t for t in scan_inputs(b, length, d, n, seed=length, h0=h0) if t is not None]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    fast_in = [t.clone().requires_grad_() for t in inputs]
    y_ref, h_ref = selective_scan_sequential(*ref_in)
    y, h = SCAN_VARIANTS[variant](*fast_in)
    assert y.shape == (b, length, d) and h.shape == (b, d, n)
    assert close(y, y_ref) and close(h, h_ref)
    w = torch.randn_like(y_ref)
    ((y_ref * w).sum() + h_ref.sum()).backward()
    ((y * w).sum() + h.sum()).backward()
    for name, t, t_ref in zip("x dt A B C h0".split(), fast_in, ref_in):
        assert close(t.grad, t_ref.grad), name


@pytest.mark.parametrize("length", [1, 7, 100])
def test_sequential_scan_matches_elementwise_reference(length):
    inputs = [t.requires_grad_() for t in scan_inputs(2, length, 8, 4, seed=length, h0=True)]
    y_ref, h_ref = reference_scan(*inputs)
    g_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), inputs)
    y, h = selective_scan_sequential(*inputs)
    g = torch.autograd.grad(y.sum() + h.sum(), inputs)
    assert close(y, y_ref) and close(h, h_ref)
    assert all(close(a, b) for a, b in zip(g, g_ref))


def test_scan_is_stable_with_strong_decay():
    x, dt, A, B, C, _ = scan_inputs(2, 300, 8, 4)
    y_ref, h_ref = reference_scan(x, dt * 50, A * 20, B, C)  # exp(-sum) far below 1e-38
    for y, h in (selective_scan_chunked(x, dt * 50, A * 20, B, C, chunk_size=16, block=128),
                 selective_scan_parallel(x, dt * 50, A * 20, B, C)):
        assert torch.isfinite(y).all() and close(y, y_ref) and close(h, h_ref)


def make_block(**kwargs):
    torch.manual_seed(0)
    block = Mamba(d_model=16, **kwargs)
    with torch.no_grad():  # the model's generic init, then the block's own, as Model does it
        for p in block.parameters():
            p.normal_(0, 0.2)
        block.init_weights()
    return block


@pytest.mark.parametrize("scan", ["default", "chunked", "parallel"])
def test_block_fast_scans_equal_sequential_and_init(scan):
    fast = make_block(chunk_size=8) if scan == "default" else make_block(scan=scan, chunk_size=8)
    slow = make_block(scan="sequential")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 37, 16, requires_grad=True)
    y_fast, y_slow = fast(x, BlockState()), slow(x)
    assert close(y_fast, y_slow)
    g_fast = torch.autograd.grad(y_fast.square().sum(), [x, *fast.parameters()])
    g_slow = torch.autograd.grad(y_slow.square().sum(), [x, *slow.parameters()])
    assert all(close(a, b, 2e-4) for a, b in zip(g_fast, g_slow))
    assert torch.equal(fast.A_log[3], torch.log(torch.arange(1.0, 17.0)))
    assert torch.equal(fast.D, torch.ones(32))
    dt = torch.nn.functional.softplus(fast.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001


@pytest.mark.parametrize("prefill", [1, 3, 5])
@pytest.mark.parametrize("d_conv", [1, 4])
@pytest.mark.parametrize("scan", ["chunked", "parallel", "sequential"])
def test_recurrent_generation_equals_full_forward(prefill, d_conv, scan):
    block = make_block(d_conv=d_conv, chunk_size=4, scan=scan).eval()
    x = torch.randn(2, 12, 16)
    full = block(x, BlockState())
    state = BlockState(cache={})
    outs = [block(x[:, :prefill], state)]
    assert state.cache[block][0].shape == (2, 32, d_conv - 1)
    outs += [block(x[:, t:t + 1], state) for t in range(prefill, 9)]
    outs.append(block(x[:, 9:], state))  # several tokens after earlier ones continue from the cache
    assert close(torch.cat(outs, 1), full, 1e-5)


def test_causal_and_records():
    block = make_block()
    x = torch.randn(1, 20, 16)
    seen = {}
    y = block(x, BlockState(recorder=lambda name, t: seen.setdefault(name, t.shape)))
    x2 = x.clone()
    x2[:, 12] += 1.0
    y2 = block(x2)
    assert torch.equal(y[:, :12], y2[:, :12]) and not torch.allclose(y[:, 12:], y2[:, 12:])
    assert seen["ssm_state"] == (1, 32, 16) and seen["dt"] == (1, 20, 32) and seen["B"] == (1, 20, 16)


def test_registered_and_bad_arguments():
    block = build_block("mamba", Dims(d_model=32), d_state=8)
    assert isinstance(block, Mamba) and block.dt_rank == 2 and block.forward_flops_per_token(64) > 0
    for kwargs in ({"d_state": 0}, {"expand": 0}, {"d_conv": 0}, {"chunk_size": 0}, {"dt_rank": 0},
                   {"scan": "blelloch"}, {"dt_min": 0.2, "dt_max": 0.1}, {"dt_min": 0.0}):
        with pytest.raises(ValueError):
            Mamba(d_model=32, **kwargs)
    with pytest.raises(MicroArchError, match="scan must be one of"):
        build_block("mamba", Dims(d_model=32), scan="fast")


ALL_SCANS = {"sequential": selective_scan_sequential, **SCAN_VARIANTS}


@pytest.mark.parametrize("variant", list(ALL_SCANS))
def test_scans_ignore_the_callers_bf16_autocast(variant):
    """Under bf16 autocast the scan must compute exactly what it computes in fp32, gradients included."""
    inputs = [t for t in scan_inputs(2, 40, 8, 4, seed=1, h0=True)]
    plain = [t.clone().requires_grad_() for t in inputs]
    under = [t.clone().requires_grad_() for t in inputs]
    y_ref, h_ref = ALL_SCANS[variant](*plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ALL_SCANS[variant](*under)
        w = torch.randn_like(y_ref)
        loss = (y * w).sum() + h.sum()
    assert y.dtype == h.dtype == torch.float32
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    ((y_ref * w).sum() + h_ref.sum()).backward()
    loss.backward()
    for name, t, t_ref in zip("x dt A B C h0".split(), under, plain):
        assert t.grad.dtype == torch.float32 and torch.equal(t.grad, t_ref.grad), name


@pytest.mark.parametrize("scan", ["chunked", "parallel", "sequential"])
def test_block_trains_and_generates_under_bf16_autocast(scan):
    """bf16 inputs (what an autocast Linear hands the block) forward and backward, and the recurrent cache
    under autocast matches the full forward, as in micro-arch generate with precision bf16."""
    block = make_block(scan=scan, chunk_size=4)
    x = torch.randn(2, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x.bfloat16().requires_grad_(), BlockState())
        full = block(x, BlockState())
        state = BlockState(cache={})
        outs = [block(x[:, :3], state)] + [block(x[:, t:t + 1], state) for t in range(3, 12)]
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in block.parameters())
    assert state.cache[block][1].dtype == torch.float32  # the recurrent state stays fp32
    # bf16 projections around an fp32 scan: outputs agree to a few bf16 roundings (2^-8 each)
    assert close(torch.cat(outs, 1).float(), full.float(), 3e-2)
    assert close(full.float(), block(x, BlockState()), 3e-2)
