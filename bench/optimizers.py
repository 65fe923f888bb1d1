"""Muon against AdamW on the default experiment: optimizer-step time and full training-step time.

Each variant is a micro-arch Trainer on experiments/shakespeare-char (batch 12 x 64 characters) with
only the optimizer settings changed. The variants take turns in rounds (A, B, C, A, B, C, ...) so that
machine noise hits them alike; each round times `--steps` training steps (Trainer.train_step: data,
forward, backward, clipping, optimizer) and, separately, `--steps` calls of optimizer.step() alone on
the gradients of the last step. Printed: medians per step, and the ratio to AdamW as the median (and
range) of each round's ratio to the AdamW steps timed in the same round.

Variants: adamw (the default), muon (micro_arch.train.muon.Muon, Newton-Schulz in the dtype `auto` picks),
muon with the iteration forced to fp32 and to bf16, and the previous implementation
(torch.optim.Muon, one parameter at a time, adjust_lr_fn="match_rms_adamw") for reference.

    python bench/optimizers.py [--device cpu|cuda] [--steps 20] [--rounds 5] [--no-torch-muon]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

VARIANTS = {
    "adamw": ["train.optimizer=adamw"],
    "muon (auto dtype)": ["train.optimizer=muon"],
    "muon, fp32 iteration": ["train.optimizer=muon", "train.muon_ns_dtype=fp32"],
    "muon, bf16 iteration": ["train.optimizer=muon", "train.muon_ns_dtype=bf16"],
    "torch.optim.Muon (before)": ["train.optimizer=muon"],
}


def torch_muon(trainer) -> None:
    """Swap the Muon half of the trainer's optimizer for torch.optim.Muon, as optim.py built it before."""
    muon, adam = trainer.optimizer.optimizers
    params = [p for g in muon.param_groups for p in g["params"]]
    cfg = trainer.cfg.train
    old = torch.optim.Muon(params, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    for g in old.param_groups:
        g["base_lr"] = cfg.muon_lr
    trainer.optimizer.optimizers = [old, adam]


def make_trainer(name: str, data, device: torch.device):
    from micro_arch.experiment import load_experiment
    from micro_arch.stages import stage_of
    from micro_arch.train.distributed import Dist
    from micro_arch.train.loop import Trainer

    cfg = load_experiment("experiments/shakespeare-char", VARIANTS[name] + [f"train.device={device.type}"])
    cfg.model.vocab_size = data.tokenizer.vocab_size
    trainer = Trainer(cfg, data, Dist(), device, pieces=stage_of(cfg).pieces(cfg, data, device))
    if name.startswith("torch.optim.Muon"):
        torch_muon(trainer)
    return trainer


def timed(fn, steps: int, device: torch.device) -> float:
    """Median seconds per call over `steps` calls."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-torch-muon", action="store_true", help="skip the slow previous implementation")
    args = parser.parse_args()

    from micro_arch.config import DataConfig
    from micro_arch.data import prepare_data

    device = torch.device(args.device)
    data = prepare_data(DataConfig())
    names = [n for n in VARIANTS if not (args.no_torch_muon and n.startswith("torch"))]
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps per variant")
    step_t = {n: [] for n in names}
    opt_t = {n: [] for n in names}
    trainers = {n: make_trainer(n, data, device) for n in names}
    counters = {n: 0 for n in names}

    def one_step(n):
        trainers[n].step_fn(counters[n], trainers[n].batches.take(counters[n]))
        counters[n] += 1

    for n in names:  # warm-up: caches, allocator, first-step optimizer state
        for _ in range(3):
            one_step(n)
    for r in range(args.rounds):
        for n, tr in trainers.items():
            step_t[n].append(timed(lambda n=n: one_step(n), args.steps, device))
            # optimizer.step() alone, on the gradients of one more backward pass
            x, y = tr.batches.take(counters[n])[0]
            tr.model(x, y).loss.backward()
            opt_t[n].append(timed(tr.optimizer.step, args.steps, device))
            tr.optimizer.zero_grad(set_to_none=True)
        print(f"round {r + 1}: " + "; ".join(f"{n} {step_t[n][-1] * 1e3:.1f} ms" for n in names), flush=True)
    # Each round's ratio pairs a variant with the AdamW steps timed next to it, so a slow spell of the
    # machine that spans a round cancels; the median and range of those ratios are printed.
    ratios = {n: [a / b for a, b in zip(step_t[n], step_t["adamw"])] for n in names}
    ref_opt = statistics.median(opt_t["adamw"])
    print(f"\n{'optimizer':28s} {'train step (ms)':>16s} {'ratio':>7s} {'per-round range':>16s} "
          f"{'optimizer.step (ms)':>20s} {'ratio':>7s}")
    for n in names:
        s, o, r = statistics.median(step_t[n]), statistics.median(opt_t[n]), ratios[n]
        print(f"{n:28s} {s * 1e3:16.1f} {statistics.median(r):7.2f} {min(r):7.2f} - {max(r):5.2f} "
              f"{o * 1e3:20.2f} {o / ref_opt:7.2f}")


if __name__ == "__main__":
    main()
