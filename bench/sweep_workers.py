"""Wall time of one fixed sweep with 1 worker and with N workers (default 2), measured in the same run.

The sweep: experiments/shakespeare-char at a small size, a grid of 8 learning rates (so every run trains
the same 8 configurations), no pruning, no full training, a fresh SQLite study each time. Each
measurement is a whole `micro-arch sweep ... --workers W` command, from start to exit: what a user waits
for. The two settings alternate for --rounds rounds; the table shows the median wall time of each and the
speed-up (1-worker time / N-worker time). One worker gets all the cores (torch's default threads);
N workers split them (the sweep's own OMP_NUM_THREADS = cores / N).

The issue's aim on the 2-core CPU: >= 1.6x with 2 workers. On a node of G GPUs, --workers G should
approach G x (untested until a multi-GPU machine is lent).

    python bench/sweep_workers.py                      # the measurement (a quiet machine)
    python bench/sweep_workers.py --steps 5 --rounds 1  # a check that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["model.d_model=64", "model.n_heads=4", "model.layers.0.repeat=2", "model.max_seq_len=64",
            "train.batch_size=8", "train.seq_len=64", "train.eval_every=1000", "train.eval_batches=4",
            "train.log_every=1000", "train.warmup_steps=5", "train.sample.max_new_tokens=20", "train.device=cpu"]
LRS = [5e-4, 7e-4, 1e-3, 1.4e-3, 2e-3, 2.8e-3, 4e-3, 5.6e-3]


def sweep_file(folder: Path, steps: int) -> Path:
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": str(ROOT / "experiments" / "shakespeare-char"), "n_trials": len(LRS), "trial_steps": steps,
        "sampler": "grid", "pruner": "none", "top_k": 0, "set": SETTINGS,
        "search_space": {"train.lr": {"type": "categorical", "choices": LRS}}}))
    return path


def one_sweep(path: Path, workers: int, runs: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # each setting splits the cores itself
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "micro_arch", "sweep", str(path), "--workers", str(workers),
                           "--runs-dir", str(runs)], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"sweep with {workers} worker(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of each trial")
    parser.add_argument("--workers", type=int, default=2, help="the parallel setting (against 1 worker)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[int, list[float]] = {1: [], args.workers: []}
    with tempfile.TemporaryDirectory() as tmp:
        path = sweep_file(Path(tmp), args.steps)
        for r in range(args.rounds):
            order = [1, args.workers] if r % 2 == 0 else [args.workers, 1]
            for w in order:
                times[w].append(one_sweep(path, w, Path(tmp) / f"runs-{r}-{w}"))
                print(f"round {r + 1}: {w} worker(s) {times[w][-1]:.1f} s", flush=True)
    one, many = statistics.median(times[1]), statistics.median(times[args.workers])
    print(f"\n{len(LRS)} trials x {args.steps} steps, {os.cpu_count()} cores, median of {args.rounds} round(s)")
    print(f"{'workers':>8} {'wall s':>8} {'speed-up':>9}")
    print(f"{1:>8} {one:>8.1f} {1.0:>8.2f}x")
    print(f"{args.workers:>8} {many:>8.1f} {one / many:>8.2f}x")


if __name__ == "__main__":
    main()
