"""From documents to one token stream: encode, mix sources by weight, join with the separator."""

from __future__ import annotations

import numpy as np

from .tokenizers import CharTokenizer

MIX_SEED = 0  # fixed: the same sources and weights always give the same training stream


def encode_documents(tokenizer, docs: list[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, CharTokenizer):  # one token per character: encode once, cut at the joins
        ids = tokenizer.encode_array("".join(docs))
        return np.split(ids, np.cumsum([len(d) for d in docs])[:-1])
    if hasattr(tokenizer, "encode_many"):
        return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_many(docs)]
    return [np.asarray(tokenizer.encode(d), dtype=np.int64) for d in docs]


def join(pieces: list[np.ndarray], separator: np.ndarray) -> np.ndarray:
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append(separator)
        parts.append(piece)
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, dtype=np.int64)


def mix(sources: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Documents drawn so that source i gives weights[i]/sum(weights) of the tokens, in a shuffled order.

    The mixture is as long as all sources together: a source with a large weight and little text has its
    documents repeated (each pass in a new order); one with more text than its share has them cut.
    """
    rng = np.random.default_rng(MIX_SEED)
    total = sum(len(doc) for docs in sources for doc in docs)
    pieces = []
    for docs, weight in zip(sources, weights):
        quota, taken = round(total * weight / sum(weights)), 0
        while taken < quota:
            for i in rng.permutation(len(docs)):
                doc = docs[i][: quota - taken]
                pieces.append(doc)
                taken += len(doc)
                if taken >= quota:
                    break
    return [pieces[i] for i in rng.permutation(len(pieces))]
