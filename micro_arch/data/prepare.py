"""prepare_data: config -> tokenizer and memory-mapped token ids, computed once and cached.

Cache layout under the cache root (DataConfig.cache_dir, else $MICRO_ARCH_CACHE, else ~/.cache/micro-arch):
  tokenizers/char-<corpus>.json, tokenizers/bpe-<size>-<corpus+size>.model
  tokens/<fingerprint>/{train.bin, val.bin, meta.json}
where <corpus> hashes the sources' descriptions (file paths, sizes, mtimes), weights and split, and the
fingerprint adds the tokenizer. A cached call reads no text.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from micro_arch.config import DataConfig
from micro_arch.errors import MicroArchError, closest

from .corpus import SEPARATOR
from .files import write_atomically
from .mixture import encode_documents, join, mix
from .shards import cache_root, digest, read_shards, write_shards
from .sources import BuiltinSource, resolve_source
from .tokenizers import CharTokenizer, SentencePieceTokenizer, train_bpe

FORMAT = "v1"  # bump when a change here alters the tokens produced from the same inputs


@dataclass
class PreparedData:
    tokenizer: object
    train: np.ndarray
    val: np.ndarray
    val_bytes: int
    fingerprint: str


class Corpus:
    """The configured sources, with their text read only when something needs it."""

    def __init__(self, cfg: DataConfig, root: Path):
        entries = cfg.source if isinstance(cfg.source, list) else [cfg.source]
        if not entries:
            raise MicroArchError("data.source: an empty list; name at least one source")
        self.sources, self.weights = [], []
        for entry in entries:
            if isinstance(entry, str):
                entry_source, weight, field = entry, 1.0, cfg.text_field
            else:  # a SourceConfig; its text_field wins when it was set
                entry_source, weight = entry.source, entry.weight
                field = entry.text_field if entry.text_field != "text" else cfg.text_field
            if weight < 0:
                raise MicroArchError(f"data.source {entry_source!r}: weight {weight} is negative")
            self.sources.append(resolve_source(entry_source, field, root))
            self.weights.append(weight)
        if sum(self.weights) <= 0:
            raise MicroArchError("data.source: all weights are 0; give at least one source a positive weight")
        fixed_split = all(isinstance(s, BuiltinSource) for s in self.sources)
        self.val_fraction = cfg.val_fraction
        total = sum(self.weights)
        described = [(s.description, w / total) for s, w in zip(self.sources, self.weights)]
        self.key = digest("corpus", FORMAT, described if len(described) > 1 else described[0][0],
                          None if fixed_split else cfg.val_fraction, SEPARATOR)

    @cached_property
    def splits(self) -> list[tuple[list[str], list[str]]]:
        return [source.split(self.val_fraction) for source in self.sources]

    def texts(self, which: str):
        for train, val in self.splits:
            yield from (train if which == "train" else val)


def get_tokenizer(cfg: DataConfig, corpus: Corpus, root: Path):
    folder = root / "tokenizers"
    if cfg.tokenizer == "char":
        path = folder / f"char-{corpus.key}.json"
        if path.is_file():
            return CharTokenizer(path.read_text(encoding="utf-8"))
        # every character of the corpus, held-out included, so that evaluation never meets an unknown one
        tokenizer = CharTokenizer.from_texts([*corpus.texts("train"), *corpus.texts("val"), SEPARATOR])
        write_atomically(path, tokenizer.chars.encode("utf-8"))
        return tokenizer
    if cfg.tokenizer == "bpe":
        name = f"bpe-{cfg.vocab_size}"
        path = folder / f"{name}-{digest(corpus.key, cfg.vocab_size)}.model"
        if not path.is_file():
            write_atomically(path, train_bpe(list(corpus.texts("train")), cfg.vocab_size))
        return SentencePieceTokenizer.from_file(path, name)
    if cfg.tokenizer.endswith(".model") or Path(cfg.tokenizer).expanduser().is_file():
        return SentencePieceTokenizer.from_file(cfg.tokenizer)
    raise MicroArchError(f"data.tokenizer {cfg.tokenizer!r}: unknown{closest(cfg.tokenizer, ['char', 'bpe'])}; "
                         "use 'char', 'bpe' or the path of a SentencePiece .model file")


def encode_corpus(corpus: Corpus, tokenizer) -> tuple[dict[str, np.ndarray], int]:
    separator = np.asarray(tokenizer.encode(SEPARATOR), dtype=np.int64)
    train_docs = [encode_documents(tokenizer, train) for train, _ in corpus.splits]
    pieces = train_docs[0] if len(train_docs) == 1 else mix(train_docs, corpus.weights)
    val_texts = list(corpus.texts("val"))
    arrays = {"train": join(pieces, separator), "val": join(encode_documents(tokenizer, val_texts), separator)}
    for split, what in (("train", "training"), ("val", "held-out")):
        if len(arrays[split]) < 2:
            raise MicroArchError(f"data.source: the {what} split is empty ({len(arrays[split])} tokens); "
                                 "use more text or change data.val_fraction")
    return arrays, len(SEPARATOR.join(val_texts).encode("utf-8"))


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Tokenizer plus train/held-out token ids (read-only memmaps), from the cache when it has them."""
    root = cache_root(cfg.cache_dir)
    corpus = Corpus(cfg, root)
    tokenizer = get_tokenizer(cfg, corpus, root)
    fingerprint = digest(corpus.key, tokenizer.identity)
    folder = root / "tokens" / fingerprint
    found = read_shards(folder)
    if found is None:
        arrays, val_bytes = encode_corpus(corpus, tokenizer)
        sources = [s.description for s in corpus.sources]
        write_shards(folder, arrays, tokenizer.vocab_size,
                     {"val_bytes": val_bytes, "tokenizer": tokenizer.name, "sources": sources})
        found = read_shards(folder)
    arrays, meta = found
    return PreparedData(tokenizer, arrays["train"], arrays["val"], meta["val_bytes"], fingerprint)
