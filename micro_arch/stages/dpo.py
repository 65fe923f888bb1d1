"""Direct preference optimisation (Rafailov et al., 2023): preference pairs against the frozen model.init_from,
held out as preference accuracy, reward margin and the DPO loss."""

from __future__ import annotations

import os
import sys

import torch

from micro_arch.stages.dpo_data import Pairs, encode_pairs
from micro_arch.stages.heldout import pair_logprobs, preference_metrics
from micro_arch.stages.losses import dpo_loss_fn
from micro_arch.stages.setup import build_reference, first_rows, prepare_stage_data
from micro_arch.stages.sft_data import global_rows
from micro_arch.stages.stage import Stage, StagePieces

HELD_OUT = ("preference_accuracy", "reward_margin", "likelihood_accuracy", "logp_chosen", "logp_rejected")


class DPO(Stage):
    name = "dpo"
    is_chat = True
    rows_per_example = 2  # a chosen and a rejected row per pair
    records = "preference pairs"

    def prepare_data(self, cfg):
        data = prepare_stage_data(cfg, self)  # init_from and the records checked first
        warn_if_starting_from_pretraining(cfg)
        return data

    def encode(self, tok, records, seq_len: int, split: str):
        return encode_pairs(tok, records, seq_len, split)

    def pieces(self, cfg, data, device, rank=0, world_size=1, resume=None) -> StagePieces:
        t = cfg.train
        reference = build_reference(cfg, device, resume)
        table = pair_logprobs(reference, data.train, t.batch_size, device, t.precision) \
            if t.dpo_precompute_reference else None
        eval_batch = t.batch_size * world_size
        val = first_rows(data.val, t.eval_batches * eval_batch)  # the same on every rank and world size
        val_reference = pair_logprobs(reference, val, eval_batch, device, t.precision)

        def held_out(model):
            m = preference_metrics(model, val, *val_reference, t.dpo_beta, eval_batch, device, t.precision)
            return m["dpo_loss"], {f"val/{k}": m[k] for k in HELD_OUT}

        return StagePieces(PairBatches(data.train, t.batch_size, t.data_order_seed, rank, world_size, table),
                           self.loss_fn(t, reference), held_out, reference=reference, notes=data.notes)

    def loss_fn(self, train, reference=None):
        """Against the frozen `reference` (None: the reference's log-probabilities come with the batch)."""
        return dpo_loss_fn(reference, train.dpo_beta)

    def synthetic_batch(self, cfg, device):
        t, vocab = cfg.train, cfg.model.vocab_size
        rows = 2 * t.batch_size
        x = torch.randint(0, vocab, (rows, t.seq_len), device=device)
        y = torch.randint(0, vocab, (rows, t.seq_len), device=device)
        return x, y, torch.zeros(rows, device=device) if t.dpo_precompute_reference else None

    def keeps_reference(self, train) -> bool:
        return not train.dpo_precompute_reference

    def before_and_after(self, start, model, val, batch_size: int, device, train) -> tuple[dict, dict]:
        """The held-out measurement of the starting weights and of the trained model (micro-arch eval)."""
        ref = pair_logprobs(start, val, batch_size, device)
        return (preference_metrics(start, val, *ref, train.dpo_beta, batch_size, device),
                preference_metrics(model, val, *ref, train.dpo_beta, batch_size, device))


def warn_if_starting_from_pretraining(cfg) -> None:
    """DPO's reference is model.init_from. A pretraining run never saw the chat template: its template tokens
    start untrained and it answers no turn, so preferences between its replies teach little. It runs, with a
    warning (once, from the first process). A Hugging Face folder says nothing of its stage: no warning."""
    from micro_arch.hf.init import resolve_source, run_dir_of
    from micro_arch.rundir import read_run_config
    from micro_arch.stages.stage import stage_of

    kind, path = resolve_source(cfg.model.init_from)
    if kind == "huggingface" or int(os.environ.get("RANK", "0")) != 0:
        return
    if not stage_of(read_run_config(run_dir_of(kind, path))).is_chat:
        print(f"warning: train.stage=dpo starts from {cfg.model.init_from}, a pretraining run (train.stage="
              "pretrain): it has never seen the chat template, so DPO's reference answers no turn; DPO usually "
              "follows SFT: run train.stage=sft from it, then DPO from the SFT run", file=sys.stderr)


class PairBatches:
    """The DPO batch source: batch(index) -> (x, y, ref_logps): this rank's pairs of the global batch, chosen
    rows then rejected rows, with the reference's log-probabilities when they were computed ahead."""

    def __init__(self, pairs: Pairs, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 reference_table: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size, self.reference_table = rank, world_size, reference_table

    def batch(self, index: int):
        rows = global_rows(len(self.pairs), self.batch_size * self.world_size, self.seed, index)
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        x, y = self.pairs.rows(mine)
        ref = None
        if self.reference_table is not None:
            ref = torch.cat([self.reference_table[0][mine], self.reference_table[1][mine]])
        return x, y, ref
