"""Pretraining: next-token loss on random windows of a token stream, held out on fixed windows."""

from __future__ import annotations

import torch

from micro_arch.data import eval_batches
from micro_arch.stages.stage import Stage, StagePieces
from micro_arch.train.prefetch import TokenWindows
from micro_arch.train.step import held_out_loss, lm_loss


class Pretrain(Stage):
    name = "pretrain"

    def prepare_data(self, cfg):
        from micro_arch.data import prepare_data

        return prepare_data(cfg.data)

    def pieces(self, cfg, data, device, rank=0, world_size=1, resume=None) -> StagePieces:
        t = cfg.train
        # The held-out windows are fixed by the global batch; each rank evaluates its rows of them,
        # so N processes evaluate exactly what one process with the global batch does.
        rows = slice(rank * t.batch_size, (rank + 1) * t.batch_size)
        val = [(x[rows], y[rows]) for x, y in eval_batches(data.val, t.batch_size * world_size, t.seq_len,
                                                             t.eval_batches)]
        return StagePieces(TokenWindows(data.train, t, rank, world_size), lm_loss,
                           lambda model: (held_out_loss(model, val, device, t.precision)[0], {}))

    def loss_fn(self, train, reference=None):
        return lm_loss

    def synthetic_batch(self, cfg, device):
        t, vocab = cfg.train, cfg.model.vocab_size
        return (torch.randint(0, vocab, (t.batch_size, t.seq_len), device=device),
                torch.randint(0, vocab, (t.batch_size, t.seq_len), device=device))
