"""Training throughput of micro-arch's trainer against a plain PyTorch GPT loop, in the same process.

The reference is the loop a careful researcher writes by hand (nanoGPT's train.py): a GPT with
LayerNorm, GELU, learned positions and a tied head; AdamW (fused on CUDA), gradient clipping 1.0,
bf16 autocast on CUDA, get_batch from the token array with pinned memory and a non_blocking copy,
the next batch fetched while the device works on the current one, the loss read every 10 steps.
micro-arch runs its real loop (`Trainer.train`: prefetch, step, bookkeeping, metrics.csv, progress) and
its throughput is read from its own metrics.csv, which leaves out the first step, evaluation and
checkpoints. Both skip `--warmup` steps; the loops alternate in rounds, each in eager mode and/or
compiled (`torch.compile` of the model; micro-arch: train.compile=true), and the table shows medians.

Settings:
  baby  nanoGPT's CPU "baby GPT": 4 layers, 4 heads, width 128, context 64, batch 12 (the default on CPU)
  gpu   nanoGPT's GPU setting: 6 layers, 6 heads, width 384, context 256, batch 64, dropout 0.2 (on CUDA)

    python bench/train_throughput.py [--steps 100] [--rounds 3] [--compile off|on|both]
    python bench/train_throughput.py --device cuda            # gpu setting, eager and compiled
    python bench/train_throughput.py --device cuda --compile on --compile-mode reduce-overhead   # CUDA graphs
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # layers, heads, width, context, batch, dropout
    "baby": dict(n_layers=4, n_heads=4, d=128, seq=64, batch=12, dropout=0.0),
    "gpu": dict(n_layers=6, n_heads=6, d=384, seq=256, batch=64, dropout=0.2),
}
LOG_EVERY = 10


class PlainBlock(nn.Module):
    def __init__(self, d, n_heads, dropout=0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.fc_proj(F.gelu(self.fc(self.ln2(x)))))


class PlainGPT(nn.Module):
    def __init__(self, vocab, d=128, n_layers=4, n_heads=4, block_size=64, dropout=0.0):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PlainBlock(d, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "fc_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def plain_setup(train: np.ndarray, vocab: int, batch: int, seq: int, lr: float = 1e-3, device="cpu",
                n_layers=4, n_heads=4, d=128, dropout=0.0):
    """The hand-written reference: (model, AdamW with decay on matrices only, get_batch)."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = PlainGPT(vocab, d, n_layers, n_heads, seq, dropout).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99), fused=device.type == "cuda")

    def get_batch():
        ix = torch.randint(len(train) - seq - 1, (batch,))
        x = torch.stack([torch.from_numpy(train[i:i + seq].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + seq].astype(np.int64)) for i in ix])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    return model, opt, get_batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(train, vocab, setting: dict, steps: int, warmup: int, device, compiled: bool,
               compile_mode: str = "default") -> float:
    """Tokens per second of the hand-written loop (nanoGPT's structure)."""
    model, opt, get_batch = plain_setup(train, vocab, setting["batch"], setting["seq"], device=device,
                                        n_layers=setting["n_layers"], n_heads=setting["n_heads"], d=setting["d"],
                                        dropout=setting["dropout"])
    forward = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compiled else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    x, y = get_batch()
    start = None
    for it in range(warmup + steps):
        if it == warmup:
            sync(device)
            start = time.perf_counter()
        with amp:
            loss = forward(x, y)
        x, y = get_batch()  # the next batch, while the device computes
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % LOG_EVERY == 0:
            loss.item()
    sync(device)
    return steps * setting["batch"] * setting["seq"] / (time.perf_counter() - start)


def overrides_for(setting: dict, steps: int, warmup: int, device, compiled: bool,
                  compile_mode: str = "default") -> list[str]:
    return [f"model.d_model={setting['d']}", f"model.n_heads={setting['n_heads']}",
            f"model.max_seq_len={setting['seq']}", f"model.layers.0.repeat={setting['n_layers']}",
            f"model.dropout={setting['dropout']}", f"train.batch_size={setting['batch']}",
            f"train.seq_len={setting['seq']}", f"train.max_steps={warmup + steps}", f"train.log_every={LOG_EVERY}",
            "train.eval_every=1000000", "train.checkpoint_every=1000000", "train.eval_batches=1",
            f"train.compile={'true' if compiled else 'false'}", f"train.compile_mode={compile_mode}",
            f"train.device={device}"]


def micro_arch_loop(experiment: str, data, setting: dict, steps: int, warmup: int, device, compiled: bool,
                    compile_mode: str = "default") -> float:
    """Tokens per second of micro-arch's real training loop, from its own metrics.csv after the warm-up."""
    from micro_arch.experiment import load_experiment
    from micro_arch.stages import stage_of
    from micro_arch.train import bookkeeping
    from micro_arch.train.distributed import Dist
    from micro_arch.train.loop import Trainer

    cfg = load_experiment(experiment, overrides_for(setting, steps, warmup, device, compiled, compile_mode))
    cfg.model.vocab_size = data.tokenizer.vocab_size
    bookkeeping.console.quiet = True
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(cfg, data, Dist(), device, pieces=stage_of(cfg).pieces(cfg, data, device)).train(Path(tmp))
        with open(Path(tmp) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) > warmup and r["tokens_per_sec"]]
    per_step = setting["batch"] * setting["seq"]
    tokens = [LOG_EVERY * per_step for _ in rows]
    return sum(tokens) / sum(n / float(r["tokens_per_sec"]) for n, r in zip(tokens, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default=None,
                        help="model and batch sizes (default: baby on CPU, gpu on CUDA)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per loop and round (a multiple of 10)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (a multiple of 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", choices=["off", "on", "both"], default=None,
                        help="eager, compiled or both (default: both on CUDA, off on CPU)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode for both loops (reduce-overhead: CUDA graphs)")
    parser.add_argument("--experiment", action="append", default=None,
                        help="experiment(s) to time (default: gpt2 and shakespeare-char on CPU, gpt2 on CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    setting = SETTINGS[args.setting or ("gpu" if cuda else "baby")]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if cuda else "off")]
    experiments = args.experiment or ([f"{ROOT}/experiments/gpt2"] if cuda else
                                      [f"{ROOT}/experiments/gpt2", f"{ROOT}/experiments/shakespeare-char"])
    if args.steps % LOG_EVERY or args.warmup % LOG_EVERY or args.warmup < LOG_EVERY:
        parser.error(f"--steps and --warmup must be multiples of {LOG_EVERY} (warmup at least {LOG_EVERY})")

    from micro_arch.config import DataConfig
    from micro_arch.data import prepare_data

    data = prepare_data(DataConfig())
    train, vocab = np.asarray(data.train), data.tokenizer.vocab_size
    gpu = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {gpu}, setting {setting}, {args.steps} timed steps after {args.warmup}")
    results: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        line = []
        for compiled in modes:
            mode = "compiled" if compiled else "eager"
            value = plain_loop(train, vocab, setting, args.steps, args.warmup, device, compiled, args.compile_mode)
            results.setdefault(("plain PyTorch GPT", compiled), []).append(value)
            line.append(f"plain {mode} {value:,.0f}")
            for e in experiments:
                value = micro_arch_loop(e, data, setting, args.steps, args.warmup, device, compiled,
                                        args.compile_mode)
                results.setdefault((f"micro-arch {Path(e).name}", compiled), []).append(value)
                line.append(f"{Path(e).name} {mode} {value:,.0f}")
        print(f"round {r + 1}: " + "; ".join(line) + " tok/s", flush=True)
    print(f"\n{'loop':36s} {'mode':9s} {'tokens/s (median)':>18s} {'ratio vs plain, same mode':>26s}")
    for compiled in modes:
        ref = statistics.median(results[("plain PyTorch GPT", compiled)])
        for (name, c), values in results.items():
            if c == compiled:
                med = statistics.median(values)
                print(f"{name:36s} {'compiled' if c else 'eager':9s} {med:18,.0f} {med / ref:26.2f}")


if __name__ == "__main__":
    main()
