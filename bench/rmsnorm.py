"""Benchmark the Triton RMSNorm against eager and torch.compile'd `rms_norm` (needs a CUDA GPU).

    python bench/rmsnorm.py [--rows 16384] [--dtypes float32 bfloat16] [--widths 1024 2048 4096 8192]

Prints, per dtype and width, forward and forward+backward times in ms and the ratio reference / Triton
(above 1: the Triton kernels are faster) against eager and against torch.compile of the same reference,
all measured in the same run, the three interleaved call by call (medians of CUDA-event timings).
The first call of each kernel at a width autotunes it; that happens in the warm-up, not in the timings.
`--smoke` runs the whole script on CPU with a few rows (Triton falls back to the reference there, compile
uses the eager backend): it checks the script, not speed, and its ratios mean nothing.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import micro_arch.model.registry  # noqa: E402, F401
from micro_arch.blocks.norms import rms_norm  # noqa: E402

WIDTHS = (1024, 2048, 4096, 8192)
EPS = 1e-5


class Timer:
    """Wall time of one call in ms: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def interleaved_medians(fns: dict, timer: Timer, reps: int, warmup: int = 5) -> dict:
    """Median ms of each fn, timed in turn A, B, C, A, B, C, ... so that drifts hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if timer.cuda:
        torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def passes(norm, x, w, dy):
    def fwd():
        with torch.no_grad():
            norm(x, w, EPS)

    def fwd_bwd():
        x.grad = w.grad = None
        norm(x, w, EPS).backward(dy)

    return fwd, fwd_bwd


def check_against_reference(norm, x, w, dy, tol):
    """The Triton output and gradients against eager `rms_norm` before anything is timed."""
    results = []
    for fn in (norm, rms_norm):
        xg, wg = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = fn(xg, wg, EPS)
        y.backward(dy)
        results.append((y.detach(), xg.grad, wg.grad))
    for name, a, b in zip(("y", "dx", "dw"), *results):
        scale = b.float().abs().max().clamp(min=1.0)  # dw sums over rows: compare relative to its size
        torch.testing.assert_close(a.float() / scale, b.float() / scale, atol=tol, rtol=tol, msg=name)


def bench_width(width: int, dtype, rows: int, device: str, reps: int, compile_backend: str) -> dict:
    from micro_arch.blocks.rmsnorm_triton import rms_norm_triton

    x = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(width, device=device)).to(dtype).requires_grad_()
    dy = torch.randn_like(x)
    check_against_reference(rms_norm_triton, x, w, dy, tol=2e-2 if dtype == torch.bfloat16 else 1e-4)
    torch._dynamo.reset()  # a fresh compile per width and dtype: never the recompile limit's eager fallback
    compiled = torch.compile(rms_norm, dynamic=False, backend=compile_backend)
    norms = {"triton": rms_norm_triton, "eager": rms_norm, "compile": compiled}
    out = {}
    for i, name in enumerate(("fwd", "fwd+bwd")):
        fns = {k: passes(norm, x, w, dy)[i] for k, norm in norms.items()}
        out[name] = interleaved_medians(fns, Timer(device), reps)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096 * 4)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS))
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="run the script on CPU with few rows (no timings)")
    args = parser.parse_args()
    if args.smoke:
        device, rows, reps, backend = "cpu", 64, 3, "eager"
        print("smoke run on CPU: Triton falls back to the reference and compile uses the eager backend; "
              "the ratios below mean nothing")
    else:
        if not torch.cuda.is_available():
            print("bench/rmsnorm.py: no CUDA GPU here; the Triton kernels only run on a GPU. Nothing to measure.")
            return 0
        from micro_arch.blocks.rmsnorm_triton import _use_kernels

        if not _use_kernels(torch.empty(1, 8, device="cuda")):
            print("bench/rmsnorm.py: triton is not available (or TRITON_INTERPRET=1 is set); nothing to measure.")
            return 0
        device, rows, reps, backend = "cuda", args.rows, args.reps, "inductor"
        import triton

        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{rows} rows; times in ms (medians of {reps}, interleaved); ratio = reference / triton")
    header = (f"{'dtype':>8} | {'width':>6} | {'pass':>8} | {'triton':>7} | {'eager':>7} {'ratio':>6} | "
              f"{'compile':>7} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for width in args.widths:
            result = bench_width(width, dtype, rows, device, reps, backend)
            for name, t in result.items():
                print(f"{dtype_name:>8} | {width:>6} | {name:>8} | {t['triton']:7.3f} | "
                      f"{t['eager']:7.3f} {t['eager'] / t['triton']:6.2f} | "
                      f"{t['compile']:7.3f} {t['compile'] / t['triton']:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
