"""Supervised fine-tuning: conversations, loss on the assistant's tokens only, held out as assistant loss."""

from __future__ import annotations

import torch

from micro_arch.stages.heldout import assistant_loss
from micro_arch.stages.losses import sft_loss
from micro_arch.stages.setup import first_rows, prepare_stage_data
from micro_arch.stages.sft_data import ConversationBatches, conversation_messages, encode_conversations
from micro_arch.stages.stage import Stage, StagePieces


class SFT(Stage):
    name = "sft"
    is_chat = True
    records = "conversations"  # what its JSONL records hold, in messages

    def prepare_data(self, cfg):
        return prepare_stage_data(cfg, self)

    def encode(self, tok, records, seq_len: int, split: str):
        return encode_conversations(tok, conversation_messages(records), seq_len, split)

    def pieces(self, cfg, data, device, rank=0, world_size=1, resume=None) -> StagePieces:
        t = cfg.train
        eval_rows = t.eval_batches * t.batch_size * world_size  # the same on every rank and world size
        val = first_rows(data.val, eval_rows)

        def held_out(model):
            return assistant_loss(model, val, t.batch_size * world_size, device, t.precision)["assistant_loss"], {}

        return StagePieces(ConversationBatches(data.train, t.batch_size, t.data_order_seed, rank, world_size), sft_loss,
                           held_out, notes=data.notes)

    def loss_fn(self, train, reference=None):
        return sft_loss

    def synthetic_batch(self, cfg, device):
        t, vocab = cfg.train, cfg.model.vocab_size
        x = torch.randint(0, vocab, (t.batch_size, t.seq_len), device=device)
        y = torch.randint(0, vocab, (t.batch_size, t.seq_len), device=device)
        return x, y, 1 / (t.batch_size * t.seq_len)

    def before_and_after(self, start, model, val, batch_size: int, device, train) -> tuple[dict, dict]:
        """The held-out measurement of the starting weights and of the trained model (micro-arch eval)."""
        return assistant_loss(start, val, batch_size, device), assistant_loss(model, val, batch_size, device)
