"""Token ids on disk: a source's token stream as numbered shard files in a cache folder named by a hash of
what produced them, and read-only views that make several shards look like one 1-D array.

    tokens/<key>/shard_00000.bin ...   uint16 ids (vocabularies under 65536), else uint32
    tokens/<key>/progress.json         while preparing: the shards finished and where to go on from
    tokens/<key>/index.json            when done: shard lengths, splits, counts
    tokens/<key>/DONE                  written last: only a folder with it is ever read

A shard is written under a temporary name and renamed when full, so a half-written shard is never read,
and a killed preparation goes on from its last finished shard (progress.json says from which piece).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .files import write_atomically

DONE = "DONE"


def cache_root(configured: str | None) -> Path:
    root = configured or os.environ.get("MICRO_ARCH_CACHE") or "~/.cache/micro-arch"
    return Path(root).expanduser()


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 2**16 else np.uint32


def shard_path(folder: Path, i: int) -> Path:
    return folder / f"shard_{i:05d}.bin"


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=1).encode())


class ShardWriter:
    """Appends tokens to shards of `shard_tokens` ids each; `on_shard(i)` runs after shard i is in place."""

    def __init__(self, folder: Path, dtype, shard_tokens: int, done_shards: int = 0, on_shard=None):
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), shard_tokens
        self.index, self.filled, self.file = done_shards, 0, None
        self.on_shard = on_shard or (lambda i: None)
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def position(self) -> int:
        return self.index * self.shard_tokens + self.filled

    def _tmp(self) -> Path:
        return self.folder / f".shard_{self.index:05d}.bin.tmp"

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self.file is None:
                self.file = open(self._tmp(), "wb")
            take = min(self.shard_tokens - self.filled, len(tokens))
            tokens[:take].tofile(self.file)
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self.file.close()
        self.file = None
        os.replace(self._tmp(), shard_path(self.folder, self.index))
        self.index, self.filled = self.index + 1, 0
        self.on_shard(self.index)  # the number of finished shards

    def close(self) -> list[int]:
        """Finish the last (short) shard; the lengths of every shard."""
        if self.file is not None:
            self._finish()
        lengths = [self.shard_tokens] * self.index
        last = shard_path(self.folder, self.index - 1) if self.index else None
        if last is not None:
            lengths[-1] = os.path.getsize(last) // self.dtype.itemsize
        return lengths

    def abandon(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            self._tmp().unlink(missing_ok=True)


def read_index(folder: Path) -> dict | None:
    if not (folder / DONE).is_file():
        return None
    return json.loads((folder / "index.json").read_text())


def open_shards(folder: Path, index: dict) -> list[np.memmap]:
    return [np.memmap(shard_path(folder, i), dtype=index["dtype"], mode="r", shape=(n,))
            for i, n in enumerate(index["shards"]) if n]


class TokenStream:
    """Several 1-D token arrays (shards, or slices of them) read as one: len, dtype, slicing, and windows
    that may cross from one array into the next. np.asarray(stream) copies it all into memory."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.dtype = np.result_type(*[p.dtype for p in self.parts]) if self.parts else np.dtype(np.uint16)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), copied out of however many parts they span."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[i])
        part = self.parts[i]
        if offset + length <= len(part):
            return np.asarray(part[offset:offset + length])
        out, got = np.empty(length, dtype=self.dtype), 0
        while got < length:
            take = min(len(self.parts[i]) - offset, length - got)
            out[got:got + take] = self.parts[i][offset:offset + take]
            got, i, offset = got + take, i + 1, 0
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            return self.window(start, max(stop - start, 0))
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(key)
        return self.window(int(key), 1)[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self.parts]) if self.parts else np.zeros(0, self.dtype)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __iter__(self):
        for part in self.parts:
            for start in range(0, len(part), 1 << 20):
                yield from np.asarray(part[start:start + (1 << 20)]).tolist()

    def slice(self, start: int, stop: int):
        """A view of tokens [start, stop) without copying: a single array when one part holds them all."""
        parts = []
        for part, at in zip(self.parts, self.starts[:-1]):
            lo, hi = max(start - at, 0), min(stop - at, len(part))
            if lo < hi:
                parts.append(part[lo:hi])
        return parts[0] if len(parts) == 1 else TokenStream(parts)


def join_streams(arrays: list, separator: np.ndarray):
    """Arrays (or streams) one after another with `separator` between them, as one view."""
    parts = []
    for i, a in enumerate(arrays):
        if i:
            parts.append(separator)
        parts.extend(a.parts if isinstance(a, TokenStream) else [a])
    parts = [p for p in parts if len(p)]
    return parts[0] if len(parts) == 1 else TokenStream(parts)
