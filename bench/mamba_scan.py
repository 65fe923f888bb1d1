"""The Mamba selective scan: chunked against the sequential loop, forward and forward+backward, same process.

Inputs as in a fresh Mamba layer: dt log-uniform in [0.001, 0.1], A = -(1..d_state) per channel, random
x, B, C. The two scans alternate within each repetition so that machine noise hits both alike; the
table shows the median milliseconds of each and the speed-up (sequential / chunked).

    python bench/mamba_scan.py [--batch 4] [--d-inner 256] [--d-state 16] [--lengths 256 1024]
                               [--chunk-size 64] [--reps 7] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blocks.mamba import selective_scan_chunked, selective_scan_sequential  # noqa: E402


def make_inputs(batch, length, d, n, grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, d, generator=g)
    dt = torch.exp(torch.rand(batch, length, d, generator=g) * math.log(100) + math.log(0.001))
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(batch, length, n, generator=g), torch.randn(batch, length, n, generator=g)
    return [t.requires_grad_(grad) for t in (x, dt, A, B, C)]


def run_once(scan, inputs, backward):
    for t in inputs:
        t.grad = None
    start = time.perf_counter()
    y, h = scan(*inputs)
    if backward:
        (y.sum() + h.sum()).backward()
    return (time.perf_counter() - start) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-inner", type=int, default=256)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scans = {"sequential": selective_scan_sequential,
             "chunked": lambda *a: selective_scan_chunked(*a, chunk_size=args.chunk_size)}
    print(f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, chunk_size {args.chunk_size}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} (after 1 warm-up), float32, CPU")
    print(f"{'seq':>6} {'pass':>12} {'sequential ms':>14} {'chunked ms':>11} {'speed-up':>9}")
    for length in args.lengths:
        for backward in (False, True):
            inputs = make_inputs(args.batch, length, args.d_inner, args.d_state, backward)
            with torch.set_grad_enabled(backward):
                times = {name: [] for name in scans}
                for rep in range(args.reps + 1):
                    for name, scan in scans.items():
                        ms = run_once(scan, inputs, backward)
                        if rep:  # the first round warms up allocators and caches
                            times[name].append(ms)
            seq, fast = (statistics.median(times[n]) for n in ("sequential", "chunked"))
            label = "fwd+bwd" if backward else "forward"
            print(f"{length:>6} {label:>12} {seq:>14.1f} {fast:>11.1f} {seq / fast:>8.1f}x")


if __name__ == "__main__":
    main()
