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
from .documents import Piece, Read, joined_utf8, read, text_of
from .tokenizers import code_points

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
    whole = joined_utf8(piece) if not sample_bytes else None
    if whole is not None:  # a .txt piece, no sample wanted: counted without splitting it
        data, n = whole
        if want_chars:
            chars = characters_of(code_chunks(data, piece))
        else:
            chars = ""
            check_utf8(data, piece)
        seen = NOT_ASCII_SPACE.search(data)  # blank: nothing else, unless other (Unicode) space
        blank = seen is None or (data[seen.start()] >= 0x80 and text_of(data[seen.start():], piece).isspace())
        return Scanned(n, len(data) - len(SEPARATOR) * max(n - 1, 0), Read([], n, blank=blank), chars)
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
    return Scanned(len(docs), len(data), got, characters_of(code_chunks(data)) if want_chars else "", sample)


NOT_ASCII_SPACE = re.compile(rb"[^ \t\n\r\x0b\x0c\x1c-\x1f]")  # str.isspace's ASCII spaces: the others
PART = 1 << 16  # bytes of a piece's text decoded at a time (see code_chunks)


def utf8_parts(data: bytes):
    """UTF-8 `data` cut before a character's first byte about every PART bytes."""
    at = 0
    while at < len(data):
        end = min(at + PART, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte
            end += 1
        yield data[at:end]
        at = end


def code_chunks(data: bytes, piece: Piece | None = None):
    """The text of a joined .txt piece (checked to be UTF-8), or of documents already read (no piece), a part at
    a time: ASCII parts as their bytes, the others as arrays of code points. Small parts keep the temporaries
    under the workers' mmap threshold, so they come from the heap, reused; a whole piece's would be fresh pages
    from the system every time (measured: 2x the time), and numpy's lookup copies its indices as int64 (8 bytes
    a character)."""
    for part in utf8_parts(data):
        if part.isascii():
            yield part
        else:
            yield code_points(text_of(part, piece) if piece else part.decode("utf-8", "surrogatepass"))


def check_utf8(data: bytes, piece: Piece) -> None:
    """A clear error, naming the byte, if a joined .txt piece is not UTF-8 (decoded a part at a time)."""
    for part in utf8_parts(data):
        if not part.isascii():
            text_of(part, piece)


def characters_of(chunks) -> str:
    """Every distinct character, sorted, of chunks of text (ASCII bytes or code points), marked in a table of
    every code point (1 MB, whose untouched pages cost nothing)."""
    seen = np.zeros(0x110000, dtype=bool)
    for codes in chunks:
        seen[np.frombuffer(codes, dtype=np.uint8) if isinstance(codes, bytes) else codes] = True
    return "".join(map(chr, np.flatnonzero(seen)))


@dataclass
class Encoded:
    tokens: np.ndarray | None  # the documents' ids joined by the separator's ids, in the shard dtype
    n_docs: int
    held_out_at: int | None  # token offset of the first held-out document in `tokens`, if the piece has one
    held_out_bytes: int  # UTF-8 bytes of the piece's held-out documents
    path: str | None = None  # where a worker process wrote `tokens` instead (raw, in the shard dtype)


def encode(piece: Piece, first_held_out: int | None, dtype: str) -> Encoded:
    """first_held_out: the index (within the piece) of its first held-out document, or None."""
    tok = _TOKENIZER
    if hasattr(tok, "ids_of"):
        return encode_chars(piece, first_held_out, dtype)
    docs = read(piece).docs
    # in batches of about BATCH_CHARS, each turned into a compact array at once: the library's own results
    # (Python lists, or Encoding objects) cost tens of bytes a token
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
        held_at = sum(lengths[:first_held_out]) + len(separator) * first_held_out
        held_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs[first_held_out:])
    return Encoded(ids, len(docs), held_at, held_bytes)


def encode_chars(piece: Piece, first_held_out: int | None, dtype: str) -> Encoded:
    """One id per character, so the documents joined by the separator encode as one text, a part at a time.
    A .txt piece wholly in one split is joined without splitting it into documents."""
    whole = joined_utf8(piece) if first_held_out in (None, 0) else None
    if whole is not None:
        (data, n), docs = whole, None
    else:
        docs = read(piece).docs
        data, n = SEPARATOR.join(docs).encode("utf-8", "surrogatepass"), len(docs)
    ids, at = np.empty(len(data), dtype=dtype), 0  # a byte is at most one character
    for codes in code_chunks(data, piece if whole is not None else None):
        _TOKENIZER.ids_of(codes, dtype, out=ids[at:at + len(codes)])
        at += len(codes)
    ids = ids[:at]
    if first_held_out is None or first_held_out >= n:
        return Encoded(ids, n, None, 0)
    if docs is None:  # all of it held out
        return Encoded(ids, n, 0, len(data) - len(SEPARATOR) * max(n - 1, 0))
    held_at = sum(len(d) for d in docs[:first_held_out]) + len(SEPARATOR) * first_held_out
    return Encoded(ids, n, held_at, sum(len(d.encode("utf-8", "surrogatepass")) for d in docs[first_held_out:]))


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


def run_encode_to_file(args):
    """In a worker process: the tokens go to a file (the last argument) that the main process reads and deletes;
    sending them back through the pool's pipe costs more than encoding them (measured: 16 MB results through
    the pipe at ~400 MB/s, where a char piece encodes at ~150 MB/s of text, two bytes a token)."""
    *work, path = args
    got = encode(*work)
    got.tokens.tofile(path)
    got.tokens, got.path = None, path
    return got
