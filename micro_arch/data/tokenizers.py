"""Tokenizers: characters, SentencePiece BPE trained on the training split, or an existing .model file.

A run directory keeps its tokenizer: tokenizer.json (every kind: its type and name), plus tokenizer.model
for SentencePiece. `load_tokenizer(run_dir)` reads them back.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np

from micro_arch.data.files import write_atomically
from micro_arch.errors import MicroArchError


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer:
    """One id per character; ids follow the sorted characters."""

    name = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        self._table = np.full(0x110000, -1, dtype=np.int32)  # every code point: a lookup needs no bounds check
        self._table[codes] = np.arange(len(codes), dtype=np.int32)
        self._lookup = np.array(list(self.chars))
        self._typed: dict[np.dtype, np.ndarray] = {}  # the table in the dtypes asked for
        self._ascii = bytes(int(i) if i >= 0 else 255 for i in self._table[:128]) + b"\xff" * 128

    @classmethod
    def from_texts(cls, texts) -> CharTokenizer:
        found: set[str] = set()
        for text in texts:
            found.update(text)
        return cls("".join(found))

    @property
    def identity(self) -> str:
        return "char:" + self.chars

    def encode_array(self, text: str, dtype=np.int32) -> np.ndarray:
        return self.ids_of(code_points(text), dtype)

    def ids_of(self, codes, dtype=np.int32, out: np.ndarray | None = None) -> np.ndarray:
        """The ids, as `dtype` (into `out` if given), of ASCII text given as bytes or of an array of code points.
        ASCII bytes are translated byte for byte (the ASCII characters sort first, so their ids are below 128),
        which spares numpy's lookup its copy of the indices as int64."""
        dtype = np.dtype(dtype)
        if isinstance(codes, bytes):
            ids = np.frombuffer(codes.translate(self._ascii), dtype=np.uint8)
            if ids.max(initial=0) == 255:
                self._refuse(np.frombuffer(codes, dtype=np.uint8))
            if out is None:
                return ids.astype(dtype)
            out[...] = ids
            return out
        if dtype not in self._typed:  # unknown characters: -1, or the largest value of an unsigned type (no id
            # reaches it: token_dtype leaves room)
            unknown = np.iinfo(dtype).max if dtype.kind == "u" else -1
            self._typed[dtype] = np.where(self._table < 0, unknown, self._table).astype(dtype)
        ids = np.take(self._typed[dtype], codes, out=out)
        if len(ids) and (ids.max() == np.iinfo(dtype).max if dtype.kind == "u" else ids.min() < 0):
            self._refuse(codes)
        return ids

    def _refuse(self, codes: np.ndarray):
        missing = sorted({chr(c) for c in np.unique(codes[self._table[codes] < 0])})
        raise ValueError(f"characters not in the vocabulary: {''.join(missing)!r}")

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        return "".join(self._lookup[np.asarray(ids, dtype=np.int64)].tolist())

    def save(self, run_dir) -> None:
        data = {"type": "char", "name": self.name, "chars": self.chars}
        write_atomically(Path(run_dir) / "tokenizer.json", json.dumps(data, ensure_ascii=False).encode())


class SentencePieceTokenizer:
    def __init__(self, model_proto: bytes, name: str):
        import sentencepiece as spm

        self.model_proto, self.name = model_proto, name
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def from_file(cls, path, name: str | None = None) -> SentencePieceTokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MicroArchError(f"data.tokenizer {str(path)!r}: no such SentencePiece model; use 'char', 'bpe' "
                                 "or the path of an existing .model file")
        try:
            return cls(path.read_bytes(), name or f"sentencepiece-{path.stem}")
        except (RuntimeError, OSError) as err:
            raise MicroArchError(f"{path}: not a SentencePiece model ({err})") from None

    @property
    def identity(self) -> str:
        import hashlib

        return "sentencepiece:" + hashlib.sha256(self.model_proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, run_dir) -> None:
        run_dir = Path(run_dir)
        write_atomically(run_dir / "tokenizer.model", self.model_proto)
        data = {"type": "sentencepiece", "name": self.name, "model": "tokenizer.model"}
        write_atomically(run_dir / "tokenizer.json", json.dumps(data).encode())


BPE_FIXED_PIECES = 256 + 2  # byte pieces, <unk> and the newline symbol
LINE_BREAKS = set("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits at


def smallest_bpe_vocab(texts) -> int:
    """The least vocab_size SentencePiece accepts for `texts`: every character it trains on is a piece."""
    found: set[str] = set()
    for text in texts:
        found.update(text)
    return len(found - LINE_BREAKS) + BPE_FIXED_PIECES


def train_bytelevel(texts, vocab_size: int) -> str:
    """A Hugging Face tokenizers byte-level BPE (GPT-2 style: 256 byte symbols, merges learnt on `texts`, no
    normalization, no prefix space), serialized as JSON. Any text encodes, and decodes back exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256:
        raise MicroArchError(f"data.vocab_size={vocab_size} is too small for byte-level BPE: it starts from "
                             "the 256 byte symbols; the smallest that works is 256: set data.vocab_size to at "
                             "least that")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


SENTENCES = 2_000_000  # lines SentencePiece trains on at most: beyond, a seeded sample of them (SentencePiece's
# own sample differs from run to run, whatever its seed: measured)
THREADS = 16  # fixed: SentencePiece's model depends on its number of threads (measured), not on the cores


def training_lines(texts: list[str]):
    """The non-blank lines of `texts`, or a sample of SENTENCES of them (the same for the same texts)."""
    n = sum(1 for text in texts for line in text.splitlines() if line.strip())
    keep = iter(np.sort(np.random.default_rng(0).choice(n, SENTENCES, replace=False))) if n > SENTENCES else None
    wanted, i = (next(keep) if keep else 0), 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if keep is None:
                yield line
            elif i == wanted:
                yield line
                wanted = next(keep, -1)
            i += 1


def train_bpe(texts: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model (serialized) that keeps text exactly: no normalization, byte fallback."""
    import sentencepiece as spm

    # SentencePiece trains on "sentences" of limited length: feed lines, and keep '\n' as its own piece
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, user_defined_symbols=["\n"], bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
            input_sentence_size=0, num_threads=THREADS,
            minloglevel=2)
    except RuntimeError as err:
        text = str(err)
        most = re.search(r"<= (\d+)", text)
        if "too high" in text or most:
            limit = f" (at most {most.group(1)})" if most else ""
            raise MicroArchError(f"data.vocab_size={vocab_size} is larger than this corpus supports{limit}; "
                                 "lower data.vocab_size or train on more text") from None
        if "required_chars" in text or "smaller than" in text:
            smallest = smallest_bpe_vocab(texts)
            raise MicroArchError(f"data.vocab_size={vocab_size} is too small for BPE with byte fallback on this "
                                 f"corpus: it needs 256 byte pieces, <unk>, the newline and each of its "
                                 f"{smallest - BPE_FIXED_PIECES} distinct characters; the smallest that works is "
                                 f"{smallest}: set data.vocab_size to at least that") from None
        raise MicroArchError(f"SentencePiece could not train a BPE tokenizer: {text.splitlines()[0]}") from None
    return model.getvalue()


def load_tokenizer(run_dir):
    """The tokenizer a run saved (tokenizer.json, with tokenizer.model for SentencePiece)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "tokenizer.json"
    if not meta_path.is_file():
        if (run_dir / "tokenizer.model").is_file():
            return SentencePieceTokenizer.from_file(run_dir / "tokenizer.model")
        raise MicroArchError(f"{run_dir}: no tokenizer.json or tokenizer.model; is this a run directory?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("type") == "char":
        return CharTokenizer(meta["chars"])
    if meta.get("type") == "sentencepiece":
        return SentencePieceTokenizer.from_file(run_dir / meta.get("model", "tokenizer.model"), meta.get("name"))
    if meta.get("type") == "huggingface":  # an SFT/DPO run from a Hugging Face folder: that folder's tokenizer
        from micro_arch.data.folder_tokenizer import FolderTokenizer

        return FolderTokenizer.load(run_dir, meta)
    raise MicroArchError(f"{meta_path}: unknown tokenizer type {meta.get('type')!r}")
