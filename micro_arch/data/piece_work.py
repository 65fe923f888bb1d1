"""What a worker process does with one piece: scan it (count documents, collect characters and a sample) or
encode it (token ids of its documents joined by the separator). Both are pure functions of the piece, so
the pieces can go to any number of processes and come back in order.

A worker holds one tokenizer, built once from a picklable spec by `start_worker`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from .corpus import SEPARATOR
from .documents import Piece, Read, joined_text, read

_TOKENIZER = None
BATCH_CHARS = 1 << 20  # documents encoded in one call of the library


def tokenizer_spec(tokenizer) -> tuple:
    """A picklable recipe for `tokenizer` (char, SentencePiece or Hugging Face tokenizers)."""
    if hasattr(tokenizer, "chars"):
        return ("char", tokenizer.chars)
    if hasattr(tokenizer, "model_proto"):
        return ("sentencepiece", tokenizer.model_proto, tokenizer.name)
    return ("huggingface", tokenizer.tok.to_str(), tokenizer.vocab_size, tokenizer.name)


def build_tokenizer(spec: tuple):
    from .tokenizers import CharTokenizer, SentencePieceTokenizer

    if spec[0] == "char":
        return CharTokenizer(spec[1])
    if spec[0] == "sentencepiece":
        return SentencePieceTokenizer(spec[1], spec[2])
    from tokenizers import Tokenizer

    from .folder_tokenizer import FolderTokenizer

    return FolderTokenizer(Tokenizer.from_str(spec[1]), spec[2], spec[3])


def start_worker(spec: tuple | None) -> None:
    """Pool initializer: one thread per process (the processes are the parallelism), and the tokenizer."""
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = build_tokenizer(spec) if spec is not None else None


def use_tokenizer(tokenizer) -> None:
    """In-process work (a small corpus): use this tokenizer object as is."""
    global _TOKENIZER
    _TOKENIZER = tokenizer


@dataclass
class Scanned:
    n_docs: int
    n_bytes: int  # UTF-8 bytes of the documents
    read: Read  # counts only (docs emptied)
    chars: str = ""
    sample: list[str] = field(default_factory=list)  # the piece's first documents, up to the sample budget


def scan(piece: Piece, sample_bytes: int, want_chars: bool) -> Scanned:
    whole = joined_text(piece) if not sample_bytes else None
    if whole is not None:  # a .txt piece, no sample wanted: counted without splitting it
        text, n = whole
        data = text.encode("utf-8", "surrogatepass")
        chars = characters([text], data) if want_chars else ""
        return Scanned(n, len(data) - len(SEPARATOR) * max(n - 1, 0), Read([], n, blank=not text or text.isspace()), chars)
    got = read(piece)
    docs, got.docs = got.docs, []
    data = "".join(docs).encode("utf-8", "surrogatepass")  # one pass for the byte count and the characters
    sample, taken = [], 0
    for doc in docs if sample_bytes else ():
        size = len(doc) if doc.isascii() else len(doc.encode("utf-8", "surrogatepass"))
        if taken + size > sample_bytes:
            break
        sample.append(doc)
        taken += size
    return Scanned(len(docs), len(data), got, characters(docs, data) if want_chars else "", sample)


NON_ASCII = re.compile("[^\x00-\x7f]")


def characters(docs: list[str], data: bytes | None = None) -> str:
    """Every distinct character of the documents, sorted: the ASCII ones from a count of the UTF-8 bytes
    (C speed), the others collected by a regular expression (few, in most text)."""
    data = "".join(docs).encode("utf-8", "surrogatepass") if data is None else data
    found = {chr(c) for c in np.flatnonzero(np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)[:128])}
    if len(data) != sum(len(d) for d in docs):  # some character takes more than one byte
        for doc in docs:
            if not doc.isascii():
                found.update(NON_ASCII.findall(doc))
    return "".join(sorted(found))


@dataclass
class Encoded:
    tokens: np.ndarray  # the documents' ids joined by the separator's ids, in the shard dtype
    n_docs: int
    held_out_at: int | None  # token offset of the first held-out document in `tokens`, if the piece has one
    held_out_bytes: int  # UTF-8 bytes of the piece's held-out documents


def encode(piece: Piece, first_held_out: int | None, dtype: str) -> Encoded:
    """first_held_out: the index (within the piece) of its first held-out document, or None."""
    tok = _TOKENIZER
    if hasattr(tok, "encode_array") and first_held_out is None:  # char, no held-out document here
        whole = joined_text(piece)
        if whole is not None:  # its documents joined, without splitting it
            return Encoded(tok.encode_array(whole[0]).astype(dtype), whole[1], None, 0)
    docs = read(piece).docs
    if hasattr(tok, "encode_array"):  # char: one id per character, so the joined text encodes in one go
        ids = tok.encode_array(SEPARATOR.join(docs)).astype(dtype)
        lengths = [len(d) for d in docs]
    else:  # in batches of about BATCH_CHARS, each turned into a compact array at once: the library's own
        # results (Python lists, or Encoding objects) cost tens of bytes a token
        separator = list(tok.encode(SEPARATOR))
        parts, lengths, start = [], [], 0
        while start < len(docs):
            end, size = start, 0
            while end < len(docs) and (size < BATCH_CHARS or end == start):
                size += len(docs[end])
                end += 1
            flat: list[int] = []
            for ids in encode_batch(tok, docs[start:end]):
                if lengths:
                    flat.extend(separator)
                flat.extend(ids)
                lengths.append(len(ids))
            parts.append(np.array(flat, dtype=dtype))
            start = end
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    held_at, held_bytes = None, 0
    if first_held_out is not None and first_held_out < len(docs):
        sep = len(SEPARATOR) if hasattr(tok, "encode_array") else len(tok.encode(SEPARATOR))
        held_at = sum(lengths[:first_held_out]) + sep * first_held_out
        held_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs[first_held_out:])
    return Encoded(ids, len(docs), held_at, held_bytes)


def encode_batch(tok, docs: list[str]) -> list:
    if hasattr(tok, "sp"):
        return tok.sp.encode(docs, num_threads=1)
    if hasattr(tok, "tok"):
        return [e.ids for e in tok.tok.encode_batch(docs, add_special_tokens=False)]
    return [tok.encode(d) for d in docs]


def run_scan(args):
    return scan(*args)


def run_encode(args):
    return encode(*args)
