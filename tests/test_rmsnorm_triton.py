"""The Triton RMSNorm block against the plain RMSNorm.

The kernel checks run in a subprocess with TRITON_INTERPRET=1 (Triton's CPU interpreter): triton.jit
reads that variable when a kernel is defined, so setting it here would not help if another test
module had imported triton first. Run as a script, this file performs those checks itself.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import micro_arch.model.registry  # noqa: E402, F401  (before blocks, as the package expects)
from micro_arch.blocks.norms import rms_norm  # noqa: E402
from micro_arch.blocks.rmsnorm_triton import RMSNormTriton, _use_kernels  # noqa: E402

EPS = 1e-5


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


def _grads(fn, x, w, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, EPS)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


# --- checks run under TRITON_INTERPRET=1 (in a subprocess) ----------------------------------------

def check_kernels():
    from micro_arch.blocks.rmsnorm_triton import rms_norm_triton

    assert _use_kernels(torch.empty(1, 8)), "kernels should run on CPU under TRITON_INTERPRET=1"
    shapes = [(1, 33), (7, 100), (64, 257), (2, 3, 100), (2, 4, 257)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for shape in shapes:
            x, w, dy = _inputs(shape, dtype)
            got = _grads(rms_norm_triton, x, w, dy)
            want = _grads(rms_norm, x, w, dy)
            for name, a, b in zip(("y", "dx", "dw"), got, want):
                assert a.shape == b.shape and a.dtype == b.dtype, (name, dtype, shape, a.dtype, b.dtype)
                torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name, s=shape: f"{n} {s}: {m}")
    # a non-contiguous input
    x, w, dy = _inputs((2, 5, 33), torch.float32)
    x, dy = x.transpose(0, 1), dy.transpose(0, 1)
    assert not x.is_contiguous()
    for a, b in zip(_grads(rms_norm_triton, x, w, dy), _grads(rms_norm, x, w, dy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # bf16 activations with a float32 weight (mixed precision): dw stays float32
    x, w, dy = _inputs((5, 33), torch.bfloat16)
    got, want = _grads(rms_norm_triton, x, w.float(), dy), _grads(rms_norm, x, w.float(), dy)
    assert got[2].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def check_every_rows_per_program():
    """Each tile height the autotuner may pick, forward and backward, fp32 and bf16: row counts that no
    tile height divides, and backward programs (4 under the interpreter) whose row ranges end mid-tile."""
    from micro_arch.blocks.rmsnorm_triton import CONFIG_SPACE, triton_bwd, triton_fwd

    for rows in sorted({r for r, _ in CONFIG_SPACE}):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            for shape in ((37, 100), (3, 5, 257)):
                x, w, dy = _inputs(shape, dtype, seed=rows)
                y, rstd = triton_fwd(x, w, EPS, config=(rows, 4))
                dx, dw = triton_bwd(dy, x, w, rstd, config=(rows, 4))
                want = _grads(rms_norm, x, w, dy)
                for name, a, b in zip(("y", "dx", "dw"), (y, dx, dw), want):
                    assert a.dtype == b.dtype, (name, rows, dtype)
                    torch.testing.assert_close(a, b, atol=tol, rtol=tol,
                                               msg=lambda m, n=name, r=rows, s=shape: f"{n} rows={r} {s}: {m}")


def check_autotune_caches_per_width():
    """The autotuner picks one of the width's candidates the first time it meets a width, then reuses it:
    a new batch shape of the same width times nothing again."""
    import triton

    from micro_arch.blocks.rmsnorm_triton import _fwd_tuned, configs_for, rms_norm_triton

    timed = []  # one entry per candidate config the autotuner times
    bench = _fwd_tuned.do_bench
    _fwd_tuned.do_bench = lambda call, quantiles=None: timed.append(1) or bench(call, quantiles)
    x, w, _ = _inputs((9, 200), torch.float32)
    rms_norm_triton(x, w, EPS)
    candidates = configs_for(triton.next_power_of_2(200))
    assert len(timed) == len(candidates) > 1, (timed, candidates)
    assert (200, "torch.float32", "torch.float32", "torch.float32", "torch.float32") in _fwd_tuned.cache
    best = (_fwd_tuned.best_config.kwargs["ROWS"], _fwd_tuned.best_config.num_warps)
    assert best in candidates
    y = rms_norm_triton(*_inputs((4, 3, 200), torch.float32)[:2], EPS)
    assert len(timed) == len(candidates)  # cached: no second round of timing
    torch.testing.assert_close(y, rms_norm(*_inputs((4, 3, 200), torch.float32)[:2], EPS))


def check_opcheck():
    from micro_arch.blocks.rmsnorm_triton import rmsnorm_bwd, rmsnorm_fwd

    x, w, dy = _inputs((3, 33), torch.float32)
    torch.library.opcheck(rmsnorm_fwd, (x.requires_grad_(), w.requires_grad_(), EPS))
    _, rstd = rmsnorm_fwd(x, w, EPS)
    torch.library.opcheck(rmsnorm_bwd, (dy, x.detach(), w.detach(), rstd.detach()))


INTERPRETED_CHECKS = ("check_kernels", "check_opcheck", "check_every_rows_per_program",
                      "check_autotune_caches_per_width")


@pytest.fixture(scope="module")
def interpreted():
    """All interpreter checks in one subprocess (importing torch and triton dominates its time)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, *INTERPRETED_CHECKS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("check", INTERPRETED_CHECKS)
def test_interpreted(interpreted, check):
    assert f"{check}: ok" in interpreted, interpreted


@pytest.mark.parametrize("width", [1, 33, 100, 1024, 2048, 3000, 4096, 8192, 65536])
def test_autotune_candidates_suit_the_width(width):
    triton = pytest.importorskip("triton")
    from micro_arch.blocks.rmsnorm_triton import CONFIG_SPACE, MAX_TILE, _default_config, _prune, configs_for

    block = triton.next_power_of_2(width)
    candidates = configs_for(block)
    assert candidates and _default_config(block) in candidates and set(candidates) <= set(CONFIG_SPACE)
    for rows, warps in candidates:
        assert rows * block <= max(MAX_TILE, block), (rows, warps)  # several rows only while the tile is small
    if 1024 <= width <= 2048:
        assert any(rows > 1 for rows, _ in candidates)  # narrow rows: several per program is tried
    if width >= 8192:
        assert all(rows == 1 for rows, _ in candidates)
    configs = [triton.Config({"ROWS": r}, num_warps=w) for r, w in CONFIG_SPACE]
    kept = _prune(configs, {}, BLOCK_SIZE=block)
    assert [(c.kwargs["ROWS"], c.num_warps) for c in kept] == [c for c in CONFIG_SPACE if c in candidates]


# --- checks in this process -----------------------------------------------------------------------

def test_cpu_fallback_equals_rms_norm(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, dy = _inputs((2, 5, 100), torch.float32)
    assert not _use_kernels(x)
    block = RMSNormTriton(100)
    with torch.no_grad():
        block.weight.copy_(w)
    xg = x.clone().requires_grad_()
    y = block(xg)
    y.backward(dy)
    want = _grads(rms_norm, x, w, dy)
    for a, b in zip((y.detach(), xg.grad, block.weight.grad), want):
        assert torch.equal(a, b)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 16, 4096, dtype=torch.bfloat16)
        w = torch.empty(4096, dtype=torch.float32)
        y, rstd = torch.ops.micro_arch.rmsnorm_fwd(x, w, EPS)
        dx, dw = torch.ops.micro_arch.rmsnorm_bwd(y, x, w, rstd)
    assert isinstance(y, FakeTensor) and isinstance(dx, FakeTensor)
    assert (y.shape, y.dtype) == (x.shape, torch.bfloat16)
    assert (rstd.shape, rstd.dtype) == ((4, 16), torch.float32)
    assert (dx.shape, dx.dtype) == (x.shape, torch.bfloat16)
    assert (dw.shape, dw.dtype) == (w.shape, torch.float32)


def test_registered_block():
    from micro_arch.model.registry import Dims, build_block, get_entry

    entry = get_entry("rmsnorm_triton")
    assert entry.kind == "norm" and entry.cls is RMSNormTriton
    block = build_block("rmsnorm_triton", Dims(d_model=24), eps=1e-6)
    assert block.eps == 1e-6 and block.weight.shape == (24,)


if __name__ == "__main__":
    import traceback

    failed = False
    for name in sys.argv[1:]:
        try:
            globals()[name]()
            print(f"{name}: ok", flush=True)
        except Exception:
            failed = True
            traceback.print_exc()
            print(f"{name}: FAILED", flush=True)
    sys.exit(1 if failed else 0)
