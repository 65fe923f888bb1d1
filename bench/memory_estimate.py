"""How close is `estimate_memory` to the real peak of a training step, for every kind of model shipped?

Dense, MoE (`Norm->MoE->+` and MoE in place of the MLP), Arctic (dense layer + parallel MoE residual),
Mamba and a Mamba/attention hybrid, in fp32 and under bf16 autocast. The real peak is, on a GPU,
torch.cuda.max_memory_allocated over two steps; on a CPU the running maximum of the CPU allocator's
allocations as the profiler records them (micro_arch.memory.measure_memory). Prints estimate, measured,
their ratio, how the estimate was made, and the analytic fallback's ratio (it must be >= 1: it errs high).

    python bench/memory_estimate.py                 # GPU if there is one, else CPU (small sizes)
    python bench/memory_estimate.py --device cpu
    python bench/memory_estimate.py --device cuda   # realistic sizes, up to GPT-2 124M
    python bench/memory_estimate.py --7b            # seconds to estimate a 7B model, against torch's MemTracker
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import micro_arch.blocks  # noqa: F401  (registers the built-in blocks)
import micro_arch.memory as memory
from micro_arch.config import ExperimentConfig, LayerGroup, ModelConfig, TrainConfig
from micro_arch.memory import analytic_estimate, estimate_memory, measure_memory

DENSE = "Norm->Attn->+->Norm->MLP->+"
MAMBA = "Norm->Mamba->+->Norm->MLP->+"
MOE = "moe(n_experts=8, top_k=2)"
KINDS = {  # name: layer groups, as fractions of the layer count where it matters
    "dense": lambda n: [LayerGroup(DENSE, n)],
    "moe (MoE only)": lambda n: [LayerGroup(f"Norm->{MOE}->+", n)],
    "moe (MLP -> MoE)": lambda n: [LayerGroup(f"Norm->Attn->+->Norm->{MOE}->+", n)],
    "arctic": lambda n: [LayerGroup([DENSE, "Norm->moe(n_experts=4, top_k=1)->+"], n)],
    "mamba": lambda n: [LayerGroup(MAMBA, n)],
    "hybrid": lambda n: [LayerGroup(MAMBA, max(1, n // 2)), LayerGroup(DENSE, 1), LayerGroup(MAMBA, max(1, n // 2 - 1))],
}
# (kind, d_model, layers, batch, seq_len, vocab)
CPU_SIZES = [("dense", 64, 2, 8, 64, 65), ("dense", 256, 2, 4, 256, 4096),
             ("moe (MoE only)", 128, 2, 8, 64, 65), ("moe (MLP -> MoE)", 128, 2, 8, 128, 512),
             ("arctic", 128, 2, 8, 64, 65), ("mamba", 128, 2, 8, 64, 65), ("hybrid", 128, 4, 4, 128, 512)]
GPU_SIZES = [("dense", 512, 8, 16, 512, 32000), ("dense", 768, 12, 8, 1024, 50304),  # GPT-2 124M
             ("moe (MoE only)", 512, 4, 8, 512, 4096), ("moe (MLP -> MoE)", 512, 4, 8, 512, 32000),
             ("arctic", 512, 4, 8, 512, 32000), ("mamba", 512, 4, 8, 512, 4096), ("hybrid", 512, 6, 8, 512, 32000)]


def config(kind, d, layers, batch, seq, vocab, precision) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(d_model=d, n_heads=max(1, d // 64), vocab_size=vocab, max_seq_len=seq,
                          layers=KINDS[kind](layers)),
        train=TrainConfig(batch_size=batch, seq_len=seq, precision=precision))


def seconds(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def accuracy_table(device: torch.device) -> None:
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"estimate_memory vs a real training step ({name}, torch {torch.__version__})")
    for col in ("model", "d_model", "layers", "batch", "seq", "vocab", "precision", "estimate MiB", "measured MiB",
                "est/meas", "analytic/meas", "estimate s", "measure s", "method"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for kind, d, layers, batch, seq, vocab in sizes:
        for precision in ("fp32", "bf16"):
            cfg = config(kind, d, layers, batch, seq, vocab, precision)
            est, est_s = seconds(estimate_memory, cfg, device)
            measured, meas_s = seconds(measure_memory, cfg, device)
            analytic = analytic_estimate(cfg, device)
            method = est.method if est.fallback_reason is None else f"{est.method} ({est.fallback_reason})"
            table.add_row(kind, str(d), str(layers), str(batch), str(seq), str(vocab), precision,
                          f"{est.peak_bytes / 2**20:,.1f}", f"{measured / 2**20:,.1f}",
                          f"{est.peak_bytes / measured:.3f}", f"{analytic.peak_bytes / measured:.2f}",
                          f"{est_s:.1f}", f"{meas_s:.1f}", method)
    Console(width=220).print(table)


def time_7b() -> None:
    """The trace keeps only the global peak (memory._peak_tracker); torch's MemTracker also snapshots every
    module, which costs O(modules) per operation. Both on the same 7B shape, same process."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    cfg = ExperimentConfig(
        model=ModelConfig(d_model=4096, n_heads=32, vocab_size=32000, max_seq_len=2048, tie_embeddings=False,
                          layers=[LayerGroup(DENSE, 32)]),
        train=TrainConfig(batch_size=1, seq_len=2048, precision="fp32"))
    cpu = torch.device("cpu")
    ours, ours_s = seconds(estimate_memory, cfg, cpu)
    peak_tracker = memory._peak_tracker
    memory._peak_tracker = lambda: (MemTracker(), _TOTAL_KEY)
    try:
        stock, stock_s = seconds(estimate_memory, cfg, cpu)
    finally:
        memory._peak_tracker = peak_tracker
    print(f"7B estimate: {ours.peak_mb:,.0f} MiB in {ours_s:.1f} s (peak-only tracker) vs {stock.peak_mb:,.0f} MiB "
          f"in {stock_s:.1f} s (torch's MemTracker): {stock_s / ours_s:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--7b", dest="seven_b", action="store_true", help="time the 7B estimate instead")
    args = parser.parse_args()
    if args.seven_b:
        time_7b()
    else:
        accuracy_table(torch.device(args.device))


if __name__ == "__main__":
    main()
