"""Preference pairs for DPO: JSONL records -> (prompt, chosen, rejected) encoded with the chat template.

A record is either
    {"prompt": "...", "chosen": "...", "rejected": "..."}          (strings: one user turn, two answers;
                                                                    `prompt` may also be a message list)
or  {"chosen": [messages...], "rejected": [messages...]}            (the same conversation but for its last,
                                                                    assistant, message)
A pair is encoded as two rows that share the prompt; the targets are the answer's tokens and its <|end|>.
Pairs that do not fit train.seq_len whole (an answer cut short would be compared unfairly) and pairs the
tokenizer cannot encode are counted and reported, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from micro_arch.data.chat_template import ChatTokenizer, check_messages, inputs_and_targets, render
from micro_arch.errors import MicroArchError

from .sft_data import trim


def pair_messages(row: dict, where: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen answer, rejected answer) of one record, validated."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if chosen is None or rejected is None:
        raise MicroArchError(f"{where}: a preference pair needs 'chosen' and 'rejected' (strings with a "
                             "'prompt', or two message lists that differ in their last assistant message)")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if prompt is None:
            raise MicroArchError(f"{where}: 'chosen' and 'rejected' are strings, so the pair needs a 'prompt'")
        prompt = check_messages(prompt + [{"role": "assistant", "content": chosen}], where)[:-1]
        answers = chosen, rejected
    elif isinstance(chosen, list) and isinstance(rejected, list):
        c, r = check_messages(chosen, f"{where} chosen"), check_messages(rejected, f"{where} rejected")
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise MicroArchError(f"{where}: 'chosen' and 'rejected' should each end with the assistant message "
                                 "they are compared on")
        if c[:-1] != r[:-1]:
            raise MicroArchError(f"{where}: 'chosen' and 'rejected' differ before their last message; a pair "
                                 "compares two answers to the same conversation")
        prompt, answers = c[:-1], (c[-1]["content"], r[-1]["content"])
    else:
        raise MicroArchError(f"{where}: 'chosen' and 'rejected' should both be strings or both message lists")
    if not answers[1].strip():
        raise MicroArchError(f"{where}: 'rejected' is empty; both answers need text")
    if answers[0] == answers[1]:
        raise MicroArchError(f"{where}: 'chosen' equals 'rejected', so there is no preference to learn; "
                             "drop the pair or fix one answer")
    return prompt, answers[0], answers[1]


@dataclass
class Pairs:
    """Encoded pairs: row i of chosen_* and rejected_* is pair i."""

    chosen_x: torch.Tensor
    chosen_y: torch.Tensor
    rejected_x: torch.Tensor
    rejected_y: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen_x)

    def report(self, split: str) -> str:
        return ", ".join([f"{len(self)} {split} pairs"] + [f"{n} skipped: {why}" for why, n in self.skipped.items()
                                                             if n])

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) with the chosen answers of `index` first, then their rejected answers."""
        return trim(torch.cat([self.chosen_x[index], self.rejected_x[index]]),
                    torch.cat([self.chosen_y[index], self.rejected_y[index]]))


def encode_pairs(tok: ChatTokenizer, records: list[tuple[str, dict]], seq_len: int, split: str) -> Pairs:
    cols: list[list[np.ndarray]] = [[], [], [], []]
    skipped = {"characters the tokenizer cannot encode": 0, "longer than seq_len": 0}
    for where, row in records:
        prompt, chosen, rejected = pair_messages(row, where)
        try:
            encoded = [render(tok, prompt + [{"role": "assistant", "content": a}]) for a in (chosen, rejected)]
        except ValueError:
            skipped["characters the tokenizer cannot encode"] += 1
            continue
        if max(len(ids) for ids, _ in encoded) - 1 > seq_len:
            skipped["longer than seq_len"] += 1
            continue
        for k, (ids, trainable) in enumerate(encoded):
            x, y = inputs_and_targets(ids, trainable, seq_len)
            cols[2 * k].append(x)
            cols[2 * k + 1].append(y)
    if not cols[0]:
        reasons = "; ".join(f"{n} {why}" for why, n in skipped.items() if n)
        raise MicroArchError(f"no usable {split} preference pair ({reasons}); raise train.seq_len (and "
                             "model.max_seq_len), or use a tokenizer that covers the text (data.tokenizer: bpe)")
    return Pairs(*(torch.from_numpy(np.stack(c)) for c in cols), skipped=skipped)
