"""Data: corpora and sources, tokenizers, cached token shards, and batches.

    data = prepare_data(cfg.data)            # .tokenizer, .train, .val, .val_bytes, .fingerprint
    x, y = sample_batch(data.train, batch_size, seq_len, seed, step, rank, world_size)

Names are imported on first use, so that a preparation worker (micro_arch.data.piece_work) starts without
torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "eval_batches": "batches", "iter_eval_windows": "batches", "sample_batch": "batches",
    "SEPARATOR": "corpus", "PreparedData": "prepare", "prepare_data": "prepare",
    "CharTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers", "load_tokenizer": "tokenizers",
}

__all__ = [*_WHERE, "Tokenizer"]


def __getattr__(name: str):
    if name == "Tokenizer":
        from .tokenizers import CharTokenizer, SentencePieceTokenizer

        return CharTokenizer | SentencePieceTokenizer
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
