"""Supervised fine-tuning data: conversations in JSONL -> padded rows with targets on assistant tokens only.

Each row holds one conversation from its start, cut to train.seq_len tokens and padded after its end
(inputs 0, targets -1). Padding only ever follows the real tokens, so under causal attention no real token
sees a pad, and every row needs no mask beyond the targets. Conversations that cannot be used are counted
and reported, never dropped silently: those the tokenizer cannot encode (a char vocabulary without one of
their characters), and those whose first assistant token lies beyond seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from micro_arch.data.chat_template import ChatTokenizer, check_messages, inputs_and_targets, render
from micro_arch.errors import MicroArchError


@dataclass
class Examples:
    """Encoded conversations of one split: rows of (inputs, targets), and what was left out."""

    x: torch.Tensor  # (n, seq_len) int64
    y: torch.Tensor  # (n, seq_len) int64, -1 where nothing is learned
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0  # conversations cut at seq_len (their later assistant tokens are not learned)

    def __len__(self) -> int:
        return len(self.x)

    def report(self, split: str) -> str:
        parts = [f"{len(self)} {split} conversations"]
        parts += [f"{n} skipped: {why}" for why, n in self.skipped.items() if n]
        if self.truncated:
            parts.append(f"{self.truncated} cut at the sequence length")
        return ", ".join(parts)


def conversation_messages(records: list[tuple[str, dict]]) -> list[tuple[str, list[dict]]]:
    """Validated messages of every record (a clear error names the file and line of the first bad one)."""
    return [(where, check_messages(row.get("messages"), where)) for where, row in records]


def encode_conversations(tok: ChatTokenizer, conversations: list[tuple[str, list[dict]]], seq_len: int,
                         split: str) -> Examples:
    xs, ys, truncated = [], [], 0
    skipped = {"characters the tokenizer cannot encode": 0, "no assistant token within seq_len": 0}
    for _, messages in conversations:
        try:
            ids, trainable = render(tok, messages)
        except ValueError:
            skipped["characters the tokenizer cannot encode"] += 1
            continue
        x, y = inputs_and_targets(ids, trainable, seq_len)
        if not (y >= 0).any():
            skipped["no assistant token within seq_len"] += 1
            continue
        truncated += len(ids) - 1 > seq_len
        xs.append(x)
        ys.append(y)
    if not xs:
        reasons = "; ".join(f"{n} with {why}" for why, n in skipped.items() if n)
        raise MicroArchError(f"no usable {split} conversation ({reasons}); raise train.seq_len (and "
                             "model.max_seq_len), or use a tokenizer that covers the text (data.tokenizer: bpe)")
    return Examples(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), skipped, truncated)


def trim(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch cut after its last learned position: later positions are padding or text after the last
    answer, which under causal attention changes no learned token's loss. Saves the padding's compute."""
    learned = (y >= 0).any(0).nonzero()
    width = int(learned[-1]) + 1 if len(learned) else 1
    return x[:, :width], y[:, :width]


def global_rows(n: int, global_batch: int, seed: int, step: int) -> torch.Tensor:
    """Row indices of the global batch at `step`: a function of (seed, step) alone, so a resumed run and
    N processes (each taking its slice) see exactly what one uninterrupted process sees."""
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + step) % 2**63)
    return torch.randint(n, (global_batch,), generator=generator)


class ConversationBatches:
    """The SFT batch source: batch(index) -> (x, y, scale), this rank's rows of the global batch, where
    scale = world_size / (learned tokens in the whole global batch), which the SFT loss multiplies by."""

    def __init__(self, examples: Examples, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.targets_per_row = (examples.y >= 0).sum(1)

    def batch(self, index: int):
        rows = global_rows(len(self.examples), self.batch_size * self.world_size, self.seed, index)
        n_targets = int(self.targets_per_row[rows].sum())
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return (*trim(self.examples.x[mine], self.examples.y[mine]), self.world_size / max(n_targets, 1))


def held_out_batches(examples: Examples, batch_size: int, max_batches: int | None = None):
    """Every held-out conversation once, in order, in batches of batch_size (the last may be short)."""
    for i, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield trim(examples.x[start:start + batch_size], examples.y[start:start + batch_size])
