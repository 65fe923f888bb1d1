"""Data: corpora and sources, tokenizers, cached token shards, and batches.

    data = prepare_data(cfg.data)            # .tokenizer, .train, .val, .val_bytes, .fingerprint
    x, y = sample_batch(data.train, batch_size, seq_len, seed, step, rank, world_size)
"""

from .batches import eval_batches, iter_eval_windows, sample_batch
from .corpus import SEPARATOR
from .prepare import PreparedData, prepare_data
from .tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer

Tokenizer = CharTokenizer | SentencePieceTokenizer

__all__ = [
    "SEPARATOR", "CharTokenizer", "PreparedData", "SentencePieceTokenizer", "Tokenizer", "eval_batches",
    "iter_eval_windows", "load_tokenizer", "prepare_data", "sample_batch",
]
