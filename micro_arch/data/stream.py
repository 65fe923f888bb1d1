"""Streaming preparation: a source's documents, piece by piece, through worker processes, into token shards.

Two passes over a source, each a map over its pieces in order (micro_arch.data.piece_work):
  scan     counts the documents of every piece (so the held-out documents, the last val_fraction, are known
           before a token is written), collects the characters (char tokenizer) and a sample of the
           training documents spread over the whole corpus (BPE training); cached as scan.json
  encode   token ids of each piece, written in order as one stream, the documents joined by the separator:
           train = the stream up to the separator before the first held-out document, val = the rest
The pieces go to `workers` processes with at most 2 per worker in flight, so memory is bounded by the
piece size, which data.prepare_memory_mb sets; the shards are the same whatever the number of workers. A worker
leaves a piece's tokens in a file beside the shards (piece_file), which this process appends to the shards in
order and deletes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from micro_arch.errors import MicroArchError

from . import piece_work
from .corpus import SEPARATOR
from .documents import Piece
from .shards import DONE, ShardWriter, read_index, token_dtype, write_json

BYTES_PER_PIECE_BYTE = 24  # one byte of text in flight, at worst (4-byte characters): its str, utf-32 codes, ids, copies
WORKER_BYTES = 64 << 20  # a worker process before any piece: the interpreter, numpy, the tokenizer library
MAIN_BYTES = 128 << 20  # this process's own share: the plan, a scan's counts, the shard being written
SMALL = 4 << 20  # a corpus under this many bytes is prepared in this process: no workers to start


@dataclass
class Settings:
    workers: int  # processes (1: in this process)
    piece_bytes: int
    shard_tokens: int


def settings(cfg, total_bytes: int) -> Settings:
    """Workers and piece size within data.prepare_memory_mb: each worker costs WORKER_BYTES plus two pieces in
    flight at BYTES_PER_PIECE_BYTE each (so fewer workers than CPUs when the budget is small), pieces of at most
    4 MB (smaller ones keep the workers evenly busy and the worst piece cheap), at least 256 KB."""
    budget = cfg.prepare_memory_mb * 2**20 - MAIN_BYTES
    wanted = max(1, min(cfg.workers or os.cpu_count() or 1, memory_allows(cfg)))
    piece = (budget - wanted * WORKER_BYTES) // (2 * BYTES_PER_PIECE_BYTE * wanted)
    piece = max(256 << 10, min(piece, 4 << 20))
    workers = 1 if total_bytes < SMALL else max(1, min(wanted, math.ceil(total_bytes / piece)))
    return Settings(workers, piece, cfg.shard_tokens)


def memory_allows(cfg) -> int:
    """The most workers data.prepare_memory_mb leaves room for (each with the smallest pieces)."""
    least = 2 * BYTES_PER_PIECE_BYTE * (256 << 10)
    return (cfg.prepare_memory_mb * 2**20 - MAIN_BYTES) // (WORKER_BYTES + least)


# --- ordered parallel map ---------------------------------------------------------------------


def ordered_map(fn, items, workers: int, spec, tokenizer=None):
    """(item, fn(item)) for every item, in order; with workers > 1 in that many processes, at most 2 items per
    worker in flight (so reading ahead never holds more than that)."""
    if workers <= 1:
        piece_work.use_tokenizer(tokenizer)
        for item in items:
            yield item, fn(item)
        return
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":  # workers forked from a server that imported only this (no torch, no __main__)
        ctx.set_forkserver_preload(["micro_arch.data.piece_work"])
    # glibc raises its mmap threshold after big frees, after which the pieces' buffers come from a heap that
    # fragments and grows piece after piece; a fixed threshold hands them back to the system when freed
    # (measured: a worker tree's peak +33% from 50 to 200 MB of text without it, +3% with it)
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    try:
        pool = ctx.Pool(workers, initializer=piece_work.start_worker, initargs=(spec,))
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.apply_async(fn, (item,))))
            if len(pending) >= 2 * workers:
                item, result = pending.popleft()
                yield item, result.get()
        while pending:
            item, result = pending.popleft()
            yield item, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def give_back_memory() -> None:
    """glibc keeps freed heap memory (up to tens of MB, more with fragmentation) after the big buffers of the
    pieces come and go; malloc_trim hands it back to the system. Elsewhere, nothing to do."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- progress ---------------------------------------------------------------------------------


class Meter:
    """A rich progress bar (MB, MB/s, tokens, ETA) on a terminal; one summary line otherwise."""

    def __init__(self, what: str, total_bytes: int, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.what, self.total, self.done, self.tokens, self.t0 = what, total_bytes, 0, 0, time.perf_counter()
        self.bar = None
        if not quiet and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TextColumn("{task.fields[tokens]}"), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total_bytes or None, tokens="")

    def advance(self, n_bytes: int, n_tokens: int = 0) -> None:
        self.done += n_bytes
        self.tokens += n_tokens
        if self.bar is not None:
            self.bar.update(self.task, advance=n_bytes, tokens=f"{self.tokens:,} tokens" if self.tokens else "")

    def close(self, quiet: bool = False) -> float:
        if self.bar is not None:
            self.bar.stop()
        seconds = time.perf_counter() - self.t0
        if not quiet and self.tokens:
            self.console.print(f"{self.what}: {self.done / 1e6:,.1f} MB -> {self.tokens:,} tokens in {seconds:.1f} s "
                               f"({self.done / 1e6 / max(seconds, 1e-9):,.1f} MB/s)")
        return seconds


# --- scan -------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What the scan pass learnt about a source."""

    piece_docs: list[int]  # documents per piece
    piece_bytes: int = 0  # the piece size they were counted with
    n_docs: int = 0
    n_bytes: int = 0
    chars: str = ""
    has_chars: bool = False  # whether `chars` was collected
    skipped: int = 0  # records whose text was not a non-empty string, or missing
    rows: int = 0  # records read (lines, rows; paragraphs of text)
    sample: list[str] = field(default_factory=list)  # not cached
    sample_counts: list[int] = field(default_factory=list)  # sampled documents per piece; not cached

    def save(self, path: Path) -> None:
        data = asdict(self)
        data.pop("sample")
        data.pop("sample_counts")
        write_json(path, data)

    @classmethod
    def load(cls, path: Path) -> Scan | None:
        return cls(**json.loads(path.read_text())) if path.is_file() else None


@dataclass
class FileCheck:
    """Per file: did any piece hold text, any rows, any row with the text field."""

    pieces: int = 0
    docs: int = 0
    rows: int = 0
    no_field: int = 0
    blank: bool = True
    columns: list[str] = field(default_factory=list)


def check_files(checks: dict[str, FileCheck], field_name: str, option: str = "data.source") -> None:
    """A file that gives no document is named (in a source of several files; one file alone falls through
    to 'the corpus is empty'), unless it is empty of rows because every text is empty."""
    for path, c in checks.items():
        if c.blank and c.pieces and not path.lower().endswith(".parquet") and not c.rows - c.docs:
            raise MicroArchError(f"{path}: the file is empty (only whitespace); put text in it, or leave it out "
                                 f"of {option}")
        if c.docs:
            continue
        if c.rows and c.no_field == c.rows:
            raise MicroArchError(f"{path}: no column {field_name!r} (columns: {', '.join(c.columns) or 'none'}); "
                                 "set data.text_field to the one that holds the text")
        if c.rows:
            if len(checks) > 1:
                raise MicroArchError(f"{path}: no text: its {c.rows} record(s) have an empty or non-string "
                                     f"{field_name!r}; put text in it, or leave the file out of {option}")
            continue
        if path.lower().endswith(".parquet"):
            raise MicroArchError(f"{path}: the file is empty (no rows); put text in it, or leave it out of {option}")
        what = "0 bytes" if os.path.getsize(path) == 0 else ("only whitespace" if c.blank else "no documents")
        raise MicroArchError(f"{path}: the file is empty ({what}); put text in it, or leave it out of {option}")


def scan_source(pieces, sizes_total: int, run: Settings, sample_bytes: int, want_chars: bool, files: list[str],
                field_name: str, label: str, quiet: bool = False) -> Scan:
    """The scan pass (see the module docstring); the sample is spread over the pieces by their size."""
    ratio = sample_bytes / max(sizes_total, 1)
    checks = {f: FileCheck() for f in files}
    result = Scan([], run.piece_bytes)
    meter = Meter(f"scanning {label}", sizes_total, quiet)
    items = ((p, math.ceil(ratio * p.size) if sample_bytes else 0, want_chars) for p in pieces)
    chars: set[str] = set()
    sample_lists = []
    try:
        for (piece, _, _), got in ordered_map(piece_work.run_scan, items, run.workers, None):
            result.piece_docs.append(got.n_docs)
            result.n_docs += got.n_docs
            result.n_bytes += got.n_bytes
            result.skipped += got.read.not_text + got.read.no_field
            result.rows += got.read.rows
            chars.update(got.chars)
            sample_lists.append(got.sample)
            c = checks.setdefault(piece.file, FileCheck())
            c.pieces += 1
            c.docs += got.n_docs
            c.rows += got.read.rows
            c.no_field += got.read.no_field
            c.blank = c.blank and got.read.blank
            c.columns += [k for k in got.read.columns if k not in c.columns][:20]
            meter.advance(piece.size)
    finally:
        meter.close(quiet=True)
    if files:
        check_files(checks, field_name)
    result.chars, result.has_chars = "".join(sorted(chars)), want_chars
    result.sample = [d for docs in sample_lists for d in docs]
    result.sample_counts = [len(s) for s in sample_lists]
    return result


def training_sample(scan: Scan, n_train: int) -> list[str]:
    """The sampled documents that are training documents (index below n_train)."""
    out, before = [], 0
    at = 0
    for n_piece, n_sampled in zip(scan.piece_docs, scan.sample_counts):
        for i in range(n_sampled):
            if before + i < n_train:
                out.append(scan.sample[at + i])
        at += n_sampled
        before += n_piece
    return out


# --- encode -----------------------------------------------------------------------------------


def held_out_count(n_docs: int, val_fraction: float, where: str) -> int:
    if n_docs == 0:
        raise MicroArchError(f"{where}: the corpus is empty (no text); point data.source at files with text "
                             "in them (and data.text_field at the column that holds it)")
    n_val = max(1, round(n_docs * val_fraction))
    if n_val >= n_docs:
        raise MicroArchError(f"{where}: only {n_docs} document(s), too few to hold out whole documents "
                             f"(data.val_fraction={val_fraction}) and still train; add text (a .txt file is split "
                             "into documents at blank lines) or lower data.val_fraction")
    return n_val


def encode_source(folder: Path, pieces_factory, scan: Scan, n_train: int, tokenizer, run: Settings,
                  total_bytes: int, label: str, meta: dict, quiet: bool = False) -> dict:
    """The encode pass into `folder` (going on from progress.json if a killed run left one); the index."""
    import numpy as np

    index = read_index(folder)
    if index is not None:
        return index
    dtype = np.dtype(token_dtype(tokenizer.vocab_size)).name
    separator = np.asarray(tokenizer.encode(SEPARATOR), dtype=dtype)
    progress_path = folder / "progress.json"
    saved = read_progress(folder)
    if saved is not None and (saved["piece_bytes"], saved["shard_tokens"]) != (run.piece_bytes, run.shard_tokens):
        saved = None  # another plan: start over (prepare_source asks for the killed run's)
    if saved is not None:  # go on from the killed run's last shard
        state = saved["state"]
    else:
        state = {"piece": 0, "docs": 0, "position": 0, "val_start": None, "val_bytes": 0}
        for stale in folder.glob("*shard_*.bin*"):  # from a killed run with another plan
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    current = dict(state)  # the accounting at the start of the piece being written

    def on_shard(done: int) -> None:
        write_json(progress_path, {"key": meta.get("key"), "piece_bytes": run.piece_bytes,
                                   "shard_tokens": run.shard_tokens, "shards": done, "state": current})

    done_shards = saved["shards"] if saved else 0
    writer = ShardWriter(folder, dtype, run.shard_tokens, done_shards, on_shard)
    written_upto = writer.position  # tokens before this are on disk already
    pieces = list_from(pieces_factory(run.piece_bytes), state["piece"])
    first_docs = docs_before(scan.piece_docs, state["piece"])
    meter = Meter(f"tokenizing {label}", total_bytes, quiet)

    def items():
        before = first_docs
        for k, piece in enumerate(pieces):
            n = scan.piece_docs[state["piece"] + k] if state["piece"] + k < len(scan.piece_docs) else 0
            first_held = n_train - before if before + n > n_train else None
            work = (piece, (max(first_held, 0) if first_held is not None else None), dtype)
            yield (*work, str(piece_file(folder, state["piece"] + k))) if run.workers > 1 else work
            before += n

    spec = piece_work.tokenizer_spec(tokenizer) if run.workers > 1 else None
    encode = piece_work.run_encode_to_file if run.workers > 1 else piece_work.run_encode
    position, docs, val_start, val_bytes = state["position"], state["docs"], state["val_start"], state["val_bytes"]
    piece_number = state["piece"]
    remove_piece_files(folder)  # from a killed run
    try:
        for (piece, *_), got in ordered_map(encode, items(), run.workers, spec, tokenizer):
            if got.path is not None:
                got.tokens = np.fromfile(got.path, dtype=dtype)
                os.unlink(got.path)
            current.update(piece=piece_number, docs=docs, position=position, val_start=val_start,
                           val_bytes=val_bytes)
            if got.n_docs:
                lead = separator if position else separator[:0]
                if got.held_out_at is not None and val_start is None:
                    val_start = position + len(lead) + got.held_out_at
                val_bytes += got.held_out_bytes
                for part in (lead, got.tokens):
                    skip = min(max(written_upto - position, 0), len(part))
                    writer.write(part[skip:])
                    position += len(part)
                docs += got.n_docs
                meter.advance(piece.size, len(lead) + len(got.tokens))
            else:
                meter.advance(piece.size)
            piece_number += 1
            if piece_number % 8 == 0:
                give_back_memory()
        lengths = writer.close()
    except BaseException:
        writer.abandon()
        remove_piece_files(folder)  # the workers are stopped by now: ordered_map's pool ended with the loop
        meter.close(quiet=True)
        raise
    meter.close(quiet)
    remove_piece_files(folder)
    if docs != scan.n_docs:
        raise MicroArchError(f"{label}: changed while it was being prepared ({scan.n_docs} documents when scanned, "
                             f"{docs} now); prepare again")
    n_val = docs - n_train
    index = {**meta, "dtype": dtype, "shards": lengths, "tokens": position, "docs": docs, "held_out_docs": n_val,
             "train_end": val_start - len(separator), "val_start": val_start,
             "val_bytes": val_bytes + len(SEPARATOR.encode()) * (n_val - 1), "separator": separator.tolist()}
    write_json(folder / "index.json", index)
    (folder / DONE).write_text("")
    progress_path.unlink(missing_ok=True)
    return index


def piece_file(folder: Path, number: int) -> Path:
    """Where a worker process leaves piece `number`'s tokens for this process to write into the shards (named
    for this process too: a worker of a killed preparation may still finish its piece while the next one runs)."""
    return folder / f".piece_{os.getpid()}_{number:06d}.tmp"


def remove_piece_files(folder: Path) -> None:
    for path in folder.glob(".piece_*.tmp"):
        path.unlink(missing_ok=True)


def read_progress(folder: Path) -> dict | None:
    """What a killed preparation of `folder` left: its piece and shard sizes, shards done, where to go on."""
    path = folder / "progress.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def list_from(pieces, start: int):
    for i, piece in enumerate(pieces):
        if i >= start:
            yield piece


def docs_before(piece_docs: list[int], piece: int) -> int:
    return sum(piece_docs[:piece])


__all__ = ["Piece", "Scan", "Settings", "encode_source", "held_out_count", "ordered_map", "scan_source",
           "settings", "training_sample"]
