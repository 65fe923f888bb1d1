"""The Mamba selective scan: every variant against the sequential loop, forward and forward+backward.

Inputs as in a fresh Mamba layer: dt log-uniform in [0.001, 0.1], A = -(1..d_state) per channel, random
x, B, C. The variants alternate within each round so that machine noise hits all alike; the table shows
the median milliseconds of each and its speed-up over the sequential loop (sequential / variant), for each
thread count asked for.

    python bench/mamba_scan.py [--batch 4] [--d-inner 256] [--d-state 16] [--lengths 256 1024]
                               [--chunk-sizes 16 32 64] [--reps 7] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from micro_arch.blocks.mamba import (  # noqa: E402
    selective_scan_chunked,
    selective_scan_parallel,
    selective_scan_sequential,
)


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


def bench(scans, args):
    names = list(scans)
    print(f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} rounds (after 1 warm-up), float32, CPU; ms (speed-up over sequential)")
    print(f"{'seq':>6} {'pass':>8} " + " ".join(f"{n:>18}" for n in names))
    for length in args.lengths:
        for backward in (False, True):
            inputs = make_inputs(args.batch, length, args.d_inner, args.d_state, backward)
            with torch.set_grad_enabled(backward):
                times = {name: [] for name in names}
                for rep in range(args.reps + 1):
                    for name in names:
                        ms = run_once(scans[name], inputs, backward)
                        if rep:  # the first round warms up allocators and caches
                            times[name].append(ms)
            med = {n: statistics.median(times[n]) for n in names}
            cells = " ".join(f"{med[n]:>9.1f} ({med['sequential'] / med[n]:>4.1f}x)" for n in names)
            print(f"{length:>6} {'fwd+bwd' if backward else 'forward':>8} {cells}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-inner", type=int, default=256)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    args = p.parse_args()
    scans = {"sequential": selective_scan_sequential, "parallel": selective_scan_parallel}
    for q in args.chunk_sizes:
        scans[f"chunked-{q}"] = functools.partial(selective_scan_chunked, chunk_size=q)
    for threads in args.threads:
        torch.set_num_threads(threads)
        bench(scans, args)


if __name__ == "__main__":
    main()
