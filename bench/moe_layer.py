"""One MoE layer against one dense SwiGLU layer, forward and backward, in the same process, interleaved.

The layers of experiments/moe (8 SwiGLU experts of width 128, top-2, d_model 128, with the Switch and z
losses) and of the dense default (SwiGLU of width 352): at the default's batch (768 tokens), where the
arithmetic counts, and at 8 tokens, where only the fixed cost of the calls is left. Medians over rounds
of ms per forward + backward; run it with --threads 1 and 2 to see how each scales.

    python bench/moe_layer.py [--threads N] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def forward_backward(layer, x, with_state: bool):
    from micro_arch.model.state import BlockState

    def run():
        state = BlockState() if with_state else None
        out = layer(x.detach().requires_grad_(), state=state)
        loss = out.square().mean()
        if with_state and state.aux_losses:
            loss = loss + sum(state.aux_losses.values())
        loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per layer per round")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from micro_arch.blocks.mlp import SwiGLU
    from micro_arch.blocks.moe import MoE

    torch.manual_seed(0)
    moe = MoE(128, d_ff=128, n_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    dense = SwiGLU(128)
    cases = {}
    for tokens, shape in (("768 tokens", (12, 64, 128)), ("8 tokens", (1, 8, 128))):
        x = torch.randn(shape)
        cases[f"moe, {tokens}"] = forward_backward(moe, x, True)
        cases[f"dense swiglu, {tokens}"] = forward_backward(dense, x, False)
    for run in cases.values():
        for _ in range(10):
            run()
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                run()
            times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.calls} calls")
    for name, values in times.items():
        print(f"{name:28s} {statistics.median(values):8.3f} ms per forward + backward")


if __name__ == "__main__":
    main()
