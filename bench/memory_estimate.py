"""How close is `estimate_memory` (fake-tensor trace) to the real peak of a training step?

On a GPU the real peak is torch.cuda.max_memory_allocated over two steps, in fp32 and bf16; on a CPU
it is the running maximum of the CPU allocator's allocations as the profiler records them
(micro_arch.memory.measure_memory). Prints estimate / measured for several sizes, and the analytic
formula's ratio as a cross-check.

    python bench/memory_estimate.py            # GPU if there is one, else CPU
    python bench/memory_estimate.py --device cpu
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import blocks  # noqa: F401  (registers the built-in blocks)
from micro_arch.config import ExperimentConfig, LayerGroup, ModelConfig, TrainConfig
from micro_arch.memory import analytic_estimate, estimate_memory, measure_memory

DENSE = "Norm->Attn->+->Norm->MLP->+"
# (d_model, layers, batch, seq_len, vocab, spec): CPU sizes, then GPU sizes
CPU_SIZES = [(64, 2, 8, 64, 65, DENSE), (128, 4, 12, 64, 65, DENSE), (256, 2, 4, 256, 65, DENSE),
             (128, 6, 16, 128, 512, DENSE), (384, 4, 8, 256, 4096, DENSE),
             (128, 2, 8, 64, 65, "Norm->Mamba->+->Norm->MLP->+")]
GPU_SIZES = [(256, 4, 16, 256, 4096, DENSE), (512, 8, 16, 512, 32000, DENSE), (1024, 12, 8, 1024, 32000, DENSE),
             (2048, 8, 4, 2048, 32000, DENSE), (512, 4, 8, 512, 4096, "Norm->Mamba->+->Norm->MLP->+")]


def config(d, layers, batch, seq, vocab, spec, precision) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(d_model=d, n_heads=max(1, d // 64), vocab_size=vocab, max_seq_len=seq,
                          layers=[LayerGroup(spec, layers)]),
        train=TrainConfig(batch_size=batch, seq_len=seq, precision=precision))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes, precisions = (GPU_SIZES, ("fp32", "bf16")) if device.type == "cuda" else (CPU_SIZES, ("fp32",))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"estimate_memory vs a real training step ({name}, torch {torch.__version__})")
    for col in ("d_model", "layers", "batch", "seq", "vocab", "block", "precision", "estimate MiB",
                "measured MiB", "est/meas", "analytic/meas", "estimate s", "method"):
        table.add_column(col, justify="right" if col not in ("block", "method") else "left")
    for d, layers, batch, seq, vocab, spec in sizes:
        for precision in precisions:
            cfg = config(d, layers, batch, seq, vocab, spec, precision)
            start = time.perf_counter()
            est = estimate_memory(cfg, device)
            seconds = time.perf_counter() - start
            measured = measure_memory(cfg, device)
            analytic = analytic_estimate(cfg, device)
            table.add_row(str(d), str(layers), str(batch), str(seq), str(vocab), spec.split("->")[1], precision,
                          f"{est.peak_bytes / 2**20:,.1f}", f"{measured / 2**20:,.1f}",
                          f"{est.peak_bytes / measured:.3f}", f"{analytic.peak_bytes / measured:.2f}",
                          f"{seconds:.1f}", est.method)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
