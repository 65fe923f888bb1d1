"""Benchmark the Triton RMSNorm against eager and torch.compile'd `rms_norm` (needs a CUDA GPU).

    python bench/rmsnorm.py [--rows 16384] [--dtype bfloat16]

Prints, per width, forward and forward+backward times in ms and the ratio reference / triton
(above 1: the Triton kernels are faster), all measured in the same run.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import micro_arch.registry  # noqa: E402, F401
from blocks.norms import rms_norm  # noqa: E402

WIDTHS = (1024, 2048, 4096, 8192)
EPS = 1e-5


def _time_ms(fn, reps=50) -> float:
    """Median time of fn() in ms, with CUDA events."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _fwd_and_fwd_bwd(norm, x, w, dy):
    def fwd():
        with torch.no_grad():
            norm(x, w, EPS)

    def fwd_bwd():
        x.grad = w.grad = None
        norm(x, w, EPS).backward(dy)

    return _time_ms(fwd), _time_ms(fwd_bwd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096 * 4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/rmsnorm.py: no CUDA GPU here; the Triton kernels only run on a GPU. Nothing to measure.")
        return 0
    from blocks.rmsnorm_triton import _use_kernels, rms_norm_triton

    dtype = getattr(torch, args.dtype)
    if not _use_kernels(torch.empty(1, 8, device="cuda")):
        print("bench/rmsnorm.py: triton is not available (or TRITON_INTERPRET=1 is set); nothing to measure.")
        return 0
    compiled = torch.compile(rms_norm, dynamic=False)
    print(f"{torch.cuda.get_device_name()}, {args.rows} rows, {args.dtype}; times in ms, "
          f"ratio = reference / triton")
    header = (f"{'width':>6} | {'pass':>8} | {'triton':>7} | {'eager':>7} {'ratio':>6} | "
              f"{'compile':>7} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for width in WIDTHS:
        x = torch.randn(args.rows, width, device="cuda", dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(width, device="cuda")).to(dtype).requires_grad_()
        dy = torch.randn_like(x)
        torch.testing.assert_close(rms_norm_triton(x, w, EPS), rms_norm(x, w, EPS), atol=2e-2, rtol=2e-2)
        tri = _fwd_and_fwd_bwd(rms_norm_triton, x, w, dy)
        eager = _fwd_and_fwd_bwd(rms_norm, x, w, dy)
        comp = _fwd_and_fwd_bwd(compiled, x, w, dy)
        for i, name in enumerate(("fwd", "fwd+bwd")):
            print(f"{width:>6} | {name:>8} | {tri[i]:7.3f} | {eager[i]:7.3f} {eager[i] / tri[i]:6.2f} | "
                  f"{comp[i]:7.3f} {comp[i] / tri[i]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
