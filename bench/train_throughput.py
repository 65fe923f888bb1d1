"""Training throughput of micro-arch against a minimal plain-PyTorch GPT loop, in the same process.

Setting: nanoGPT's CPU "baby GPT" (4 layers, 4 heads, width 128, context 64, batch 12), characters of
the built-in Shakespeare corpus, AdamW (lr 1e-3, betas 0.9/0.99), gradient clipping 1.0.
The reference is the loop a researcher would write by hand: nanoGPT-style model, get_batch with
torch.randint + torch.stack, forward, backward, clip, step. The two alternate in rounds so that
machine noise hits both alike; the printed ratio is micro-arch tokens/s over reference tokens/s.

    python bench/train_throughput.py [--steps 200] [--rounds 3] [--experiment experiments/gpt2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PlainBlock(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab, d=128, n_layers=4, n_heads=4, block_size=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(PlainBlock(d, n_heads) for _ in range(n_layers))
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
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def plain_setup(train: np.ndarray, vocab: int, batch: int, seq: int, lr: float = 1e-3):
    """The hand-written reference: (model, AdamW with decay on matrices only, get_batch)."""
    torch.manual_seed(0)
    model = PlainGPT(vocab, block_size=seq)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))

    def get_batch():
        ix = torch.randint(len(train) - seq - 1, (batch,))
        x = torch.stack([torch.from_numpy(train[i:i + seq].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + seq].astype(np.int64)) for i in ix])
        return x, y

    return model, opt, get_batch


def plain_loop(train: np.ndarray, vocab: int, steps: int, batch: int, seq: int) -> float:
    """Tokens per second of the hand-written loop."""
    model, opt, get_batch = plain_setup(train, vocab, batch, seq)

    def step():
        x, y = get_batch()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq / (time.perf_counter() - start)


def micro_arch_loop(experiment: str, data, steps: int) -> tuple[float, object]:
    """Tokens per second of micro-arch's own training step (batches, step, no bookkeeping) on the experiment."""
    from micro_arch.distributed import Dist
    from micro_arch.experiment import load_experiment
    from micro_arch.train import Trainer, tokens_per_step

    cfg = load_experiment(experiment)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    trainer = Trainer(cfg, data, Dist(), torch.device("cpu"))

    def step(s):
        trainer.step_fn(s, trainer.batches.take(s))
        trainer.batches.prepare(s + 1)

    for s in range(10):
        step(s)
    start = time.perf_counter()
    for s in range(10, 10 + steps):
        step(s)
    elapsed = time.perf_counter() - start
    return steps * tokens_per_step(cfg, 1) / elapsed, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--experiment", action="append", default=None,
                        help="experiment(s) to time (default: experiments/gpt2 and experiments/shakespeare-char)")
    args = parser.parse_args()
    experiments = args.experiment or ["experiments/gpt2", "experiments/shakespeare-char"]

    from micro_arch.config import DataConfig
    from micro_arch.data import prepare_data

    data = prepare_data(DataConfig())
    train = np.asarray(data.train)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    plain, ours = [], {e: [] for e in experiments}
    for r in range(args.rounds):
        plain.append(plain_loop(train, data.tokenizer.vocab_size, args.steps, 12, 64))
        for e in experiments:
            ours[e].append(micro_arch_loop(e, data, args.steps)[0])
        print(f"round {r + 1}: plain {plain[-1]:,.0f} tok/s; "
              + "; ".join(f"{e} {v[-1]:,.0f} tok/s" for e, v in ours.items()))
    ref = statistics.median(plain)
    print(f"\n{'loop':40s} {'tokens/s (median)':>18s} {'ratio vs plain':>15s}")
    print(f"{'plain PyTorch GPT (reference)':40s} {ref:18,.0f} {1.0:15.2f}")
    for e, values in ours.items():
        med = statistics.median(values)
        print(f"{'micro-arch ' + e:40s} {med:18,.0f} {med / ref:15.2f}")


if __name__ == "__main__":
    main()
