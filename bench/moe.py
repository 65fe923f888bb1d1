"""MoE training step against the dense training step, in the same process, interleaved.

A training step is what the trainer runs: forward (under the experiment's autocast), backward, gradient
clipping, AdamW step, zero_grad, on random tokens (the same for every model). Models:
- dense: the default experiment (experiments/shakespeare-char), the reference of every ratio;
- dense at MoE FLOPs: the same with the SwiGLU width set so that its training FLOPs per token match the
  MoE model's (the issue's "matched active FLOPs");
- moe: experiments/moe (8 experts, top-2), grouped matmuls (`kernel=auto`);
- moe, loop kernel: the same routing with the per-expert loop fallback instead of the grouped matmul;
- with --old REV: the MoE block as it was at git revision REV (e.g. the Python loop over experts with
  host reads before the grouped rewrite, `--old bae0690^`), on the same weights.
Each round times every model for --steps steps after --warmup steps, in turn; the table shows medians
over rounds of steps/s and the ratio to the dense step. With --compile every model is compiled (in the
warmup, so leave it enough steps). With --phases a second table gives each model's median forward,
backward, clipping and optimizer (step + zero_grad) times: where the MoE step's extra time goes.

CPU (the experiments as they are):   python bench/moe.py --threads 1   (on a busy shared machine)
GPU (nanoGPT's GPU setting: 6 layers, 6 heads, width 384, context 256, batch 64, dropout 0.2, bf16
autocast; the MoE with 8 experts, top-2, expert width 384 in place of the MLP):
                                     python bench/moe.py --device cuda [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_SETTING = ["model.d_model=384", "model.n_heads=6", "model.max_seq_len=256", "train.seq_len=256",
               "train.batch_size=64", "model.layers.0.repeat=6", "model.dropout=0.2"]


def build(experiment: str, overrides: list[str], device: torch.device):
    from micro_arch.experiment import load_experiment
    from micro_arch.model.model import Model
    from micro_arch.train.optim import build_optimizer

    cfg = load_experiment(ROOT / "experiments" / experiment, ["model.vocab_size=65", *overrides])
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(cfg.model)
    return cfg, model, build_optimizer(model, cfg.train, device)


def old_block_class(rev: str):
    """The MoE class of blocks/moe.py at git revision `rev`, loaded without registering it."""
    source = subprocess.run(["git", "show", f"{rev}:blocks/moe.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.replace('@register_block("moe", kind="moe")', "")
    module = types.ModuleType(f"moe_at_{rev}")
    exec(compile(source, f"blocks/moe.py@{rev}", "exec"), module.__dict__)  # noqa: S102 - our own file at rev
    return module.MoE


def make_step(cfg, model, optimizer, device: torch.device, precision: str, compile_model: bool = False,
              phases: dict[str, list[float]] | None = None):
    """A training step on random tokens. With `phases`, each step appends its forward, backward, clipping and
    optimizer times (ms) there, synchronising the device between them (so only for the breakdown)."""
    from micro_arch.device import autocast
    from micro_arch.model.state import BlockState

    t = cfg.train
    forward = torch.compile(model) if compile_model else model
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 65, (t.batch_size, t.seq_len + 1), generator=gen).to(device) for _ in range(8)]
    calls = [0]

    def mark(name: str | None, since: float) -> float:
        if phases is None:
            return since
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if name:
            phases.setdefault(name, []).append((now - since) * 1e3)
        return now

    def step():
        tokens = batches[calls[0] % len(batches)]
        calls[0] += 1
        now = mark(None, 0.0)
        with autocast(device, precision):
            out = forward(tokens[:, :-1], tokens[:, 1:], state=BlockState())
        now = mark("forward", now)
        out.loss.backward()
        now = mark("backward", now)
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        now = mark("clip", now)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer", now)

    return step


def matched_width(moe_flops: float, base: list[str], seq: int) -> int:
    """The SwiGLU width (a multiple of 8) whose dense model has the MoE model's FLOPs per token
    (FLOPs per token are linear in the width: solve from two widths)."""
    def flops(width):
        overrides = [*base, f"model.defaults.MLP=swiglu(d_ff={width})"]
        return build("shakespeare-char", overrides, torch.device("meta"))[1].flops_per_token(seq)

    low, high = flops(64), flops(128)
    return max(8, round((64 + (moe_flops - low) * 64 / (high - low)) / 8) * 8)


def timed(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-loop", action="store_true", help="leave out the loop-kernel MoE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--old", metavar="REV", help="also time the MoE block of this git revision")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (compiled in the warmup)")
    parser.add_argument("--phases", action="store_true",
                        help="also time forward, backward, clipping and optimizer apart (syncs the device between them)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = GPU_SETTING if device.type == "cuda" else []
    moe_base = [*base, "model.defaults.MoE=moe(n_experts=8, top_k=2, d_ff=384)"] if device.type == "cuda" else base
    precision = "bf16" if device.type == "cuda" else "fp32"

    variants = {"dense": ("shakespeare-char", base)}
    _, moe_meta, _ = build("moe", moe_base, torch.device("meta"))
    seq = 256 if device.type == "cuda" else 64
    moe_flops = moe_meta.flops_per_token(seq)
    width = matched_width(moe_flops, base, seq)
    variants[f"dense at MoE FLOPs (d_ff={width})"] = ("shakespeare-char", [*base, f"model.defaults.MLP=swiglu(d_ff={width})"])
    variants["moe (grouped matmul)"] = ("moe", moe_base)
    if not args.no_loop:
        spec = "moe(n_experts=8, top_k=2, d_ff=384, kernel=loop)" if device.type == "cuda" else \
            "moe(n_experts=8, top_k=2, d_ff=128, aux_loss_coef=0.01, z_loss_coef=0.001, kernel=loop)"
        variants["moe (loop kernel)"] = ("moe", [*base, f"model.defaults.MoE={spec}"])

    if args.old:
        variants[f"moe (blocks/moe.py at {args.old})"] = ("moe", moe_base)
    steps, flops, phases = {}, {}, {}
    for name, (experiment, overrides) in variants.items():
        cfg, model, optimizer = build(experiment, overrides, device)
        flops[name] = model.flops_per_token(cfg.train.seq_len)  # the old block counted every expert
        if name.startswith("moe (blocks/moe.py at"):
            from micro_arch.blocks.moe import MoE

            old = old_block_class(args.old)
            for module in model.modules():
                if isinstance(module, MoE):
                    module.__class__ = old  # same parameters and buffers, the old forward
        phases[name] = {} if args.phases else None
        steps[name] = make_step(cfg, model, optimizer, device, precision, args.compile, phases[name])
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads") + f", precision {precision}")
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
        if args.phases:
            phases[name].clear()
    rates = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(timed(step, args.steps, device))
        print(f"round {r + 1}: " + "; ".join(f"{n} {v[-1]:.2f}" for n, v in rates.items()) + " steps/s")
    dense = statistics.median(rates["dense"])
    print(f"\n{'model':40s} {'train FLOPs/token':>17s} {'steps/s (median)':>17s} {'ratio vs dense':>15s}")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"{name:40s} {flops[name]:17,.0f} {med:17.2f} {med / dense:15.2f}")
    if args.phases:
        names = list(phases["dense"])
        print(f"\n{'ms per step (median)':40s} " + " ".join(f"{n:>10s}" for n in names))
        for name, times in phases.items():
            print(f"{name:40s} " + " ".join(f"{statistics.median(times[n]):10.2f}" for n in names))


if __name__ == "__main__":
    main()
