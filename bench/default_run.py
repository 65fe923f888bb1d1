"""The default experiment's bar, end to end: wall time and held-out loss at step 2000 of
`micro-arch run experiments/shakespeare-char` against a plain PyTorch GPT of the same sizes.

The reference is nanoGPT's CPU "baby GPT" as one would write it by hand (bench/train_throughput.py's
plain_setup: LayerNorm, GELU, learned positions, tied head), trained with the same schedule (2000 steps,
lr 1e-3 -> 1e-4 cosine after 100 warmup, AdamW betas 0.9/0.99, clip 1.0) and evaluated the same way
(every 250 steps on 20 fixed held-out batches of the built-in split). Wall time includes evaluation.
micro-arch runs as a subprocess through its command line, exactly as the README runs it.

    python bench/default_run.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import plain_setup  # noqa: E402


def plain_run(steps: int) -> tuple[float, float]:
    """(seconds, final held-out loss) of the hand-written loop."""
    from micro_arch.config import DataConfig
    from micro_arch.data import eval_batches, prepare_data

    data = prepare_data(DataConfig())
    train, vocab = np.asarray(data.train), data.tokenizer.vocab_size
    batch, seq, warmup, lr, min_lr = 12, 64, 100, 1e-3, 1e-4
    val = eval_batches(data.val, batch, seq, 20)
    start = time.perf_counter()
    model, opt, get_batch = plain_setup(train, vocab, batch, seq, lr)

    def lr_at(it):
        if it < warmup:
            return lr * (it + 1) / warmup
        return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (steps - warmup))) * (lr - min_lr)

    @torch.no_grad()
    def held_out():
        model.eval()
        loss = sum(model(x, y).item() for x, y in val) / len(val)
        model.train()
        return loss

    loss = float("nan")
    for it in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        x, y = get_batch()
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % 250 == 0 or it + 1 == steps:
            loss = held_out()
    return time.perf_counter() - start, loss


def micro_arch_run(steps: int) -> tuple[float, dict, float]:
    """(command wall seconds, the trainer's own time accounts, final held-out loss) of `micro-arch run`."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "micro_arch", "run", "experiments/shakespeare-char",
                        "--runs-dir", tmp, "--set", f"train.max_steps={steps}"], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        summary = json.loads(next(Path(tmp).glob("*/*/summary.json")).read_text())
    times = {k: summary.get(f"{k}_time_s") for k in ("wall", "train", "compile", "eval", "checkpoint")}
    return wall, times, summary["final_val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    plain_s, plain_loss = plain_run(args.steps)
    print(f"plain PyTorch GPT      {plain_s:7.1f} s   held-out loss {plain_loss:.4f}")
    wall, times, loss = micro_arch_run(args.steps)
    trained = times["wall"]
    print(f"micro-arch run         {wall:7.1f} s   held-out loss {loss:.4f}   (training loop {trained:.1f} s: "
          f"steps {times['train']:.1f}, first step {times['compile']:.1f}, evaluation {times['eval']:.1f}, "
          f"checkpoints {times['checkpoint']:.1f}; the rest is start-up and the sample)")
    print(f"time ratio micro-arch / plain: {wall / plain_s:.2f} (command), {trained / plain_s:.2f} (training loop)")


if __name__ == "__main__":
    main()
