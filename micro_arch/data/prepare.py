"""prepare_data: the configured sources -> a tokenizer and train/held-out token arrays, cached.

Each source is prepared on its own, streamed into token shards (micro_arch.data.stream) in
    <cache>/tokens/<source key>/shard_*.bin, index.json, DONE
where the key hashes the source's description (file paths, sizes, mtimes), its split and the tokenizer;
tokenizers live in <cache>/tokenizers/, scans in <cache>/scans/. A cached call reads no text.
`data.train` and `data.val` are read-only views over the shards: a memmap when one shard holds the split,
else a TokenStream (several shards, or a mixture: each source cut or repeated to its share of the tokens).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from micro_arch.config import DataConfig
from micro_arch.errors import MicroArchError, closest

from .corpus import SEPARATOR, shakespeare_documents
from .documents import Piece, parquet_pieces, plan
from .files import write_atomically
from .hub import StreamedHub
from .mixture import mixture
from .shards import TokenStream, cache_root, digest, join_streams, open_shards, read_index
from .sources import BuiltinSource, FileSource, HubSource, resolve_source
from .stream import (
    Scan,
    Settings,
    encode_source,
    held_out_count,
    memory_allows,
    read_progress,
    scan_source,
    settings,
    training_sample,
)
from .tokenizers import CharTokenizer, SentencePieceTokenizer, train_bpe, train_bytelevel

FORMAT = "v1"  # bump when a change here alters the tokens produced from the same inputs
SHARDS_FORMAT = "shards-v1"
TRAINED = ("char", "bpe", "bytelevel")


@dataclass
class PreparedData:
    tokenizer: object
    train: np.ndarray | TokenStream
    val: np.ndarray | TokenStream
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
            source = resolve_source(entry_source, field, root)
            if isinstance(source, HubSource):  # streamed up to data.max_tokens, not downloaded whole
                source = StreamedHub(source, cfg.max_tokens, cfg.tokenizer, cfg.val_fraction)
            self.sources.append(source)
            self.weights.append(weight)
        if sum(self.weights) <= 0:
            raise MicroArchError("data.source: all weights are 0; give at least one source a positive weight")
        fixed_split = all(isinstance(s, BuiltinSource) for s in self.sources)
        self.val_fraction = cfg.val_fraction
        total = sum(self.weights)
        described = [(s.description, w / total) for s, w in zip(self.sources, self.weights)]
        self.key = digest("corpus", FORMAT, described if len(described) > 1 else described[0][0],
                          None if fixed_split else cfg.val_fraction, SEPARATOR)


# --- one source, as pieces --------------------------------------------------------------------


@dataclass
class SourcePlan:
    """How a source is read: its pieces (a function of the piece size), about how many bytes, which files."""

    description: str  # identifies the source's documents (for the caches)
    label: str
    pieces: object  # piece_bytes -> iterator of Piece
    total_bytes: int
    files: list[str]
    field: str
    fixed_held_out: int | None  # the built-in corpus holds out fixed works

    def n_train(self, n_docs: int, val_fraction: float) -> int:
        if self.fixed_held_out is not None:
            return n_docs - self.fixed_held_out
        return n_docs - held_out_count(n_docs, val_fraction, self.label)


def doc_pieces(name: str, docs: list[str], piece_bytes: int):
    """In-memory documents as pieces of about piece_bytes each."""
    group, size = [], 0
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= piece_bytes:
            yield Piece(name, "docs", size=size, data=tuple(group))
            group, size = [], 0
    if group:
        yield Piece(name, "docs", size=size, data=tuple(group))


def plan_source(source, cfg: DataConfig, root: Path, quiet: bool = False) -> SourcePlan:
    if isinstance(source, BuiltinSource):
        train, val = shakespeare_documents()
        docs = train + val
        return SourcePlan(source.description, "shakespeare", lambda b: doc_pieces("shakespeare", docs, b),
                          sum(len(d) for d in docs), [], "text", len(val))
    if isinstance(source, FileSource):
        files, builder, field = source.files, source.builder, source.text_field
        return SourcePlan(source.description, source.pattern, lambda b: plan(files, builder, field, b),
                          sum(os.path.getsize(f) for f in files), files, field, None)
    files = source.files(root, quiet)  # a hub dataset, streamed into local parts up to its budget
    return SourcePlan(source.description, source.name, lambda b: plan(files, "json", "text", b),
                      sum(os.path.getsize(f) for f in files), files, "text", None)


# --- tokenizer --------------------------------------------------------------------------------


def tokenizer_path(cfg: DataConfig, corpus: Corpus, root: Path) -> Path | None:
    folder = root / "tokenizers"
    if cfg.tokenizer == "char":
        return folder / f"char-{corpus.key}.json"
    if cfg.tokenizer == "bpe":
        return folder / f"bpe-{cfg.vocab_size}-{digest(corpus.key, cfg.vocab_size, cfg.tokenizer_sample_bytes)}.model"
    if cfg.tokenizer == "bytelevel":
        return folder / (f"bytelevel-{cfg.vocab_size}-"
                         f"{digest(corpus.key, cfg.vocab_size, cfg.tokenizer_sample_bytes)}.json")
    return None


def load_cached_tokenizer(cfg: DataConfig, path: Path | None):
    """The tokenizer when it needs no training (a path, or trained before), else None."""
    if path is None:
        return tokenizer_from_file(cfg.tokenizer)
    if not path.is_file():
        return None
    if cfg.tokenizer == "char":
        return CharTokenizer(path.read_text(encoding="utf-8"))
    if cfg.tokenizer == "bpe":
        return SentencePieceTokenizer.from_file(path, f"bpe-{cfg.vocab_size}")
    return hf_tokenizer(path.read_text(encoding="utf-8"), f"bytelevel-{cfg.vocab_size}")


def hf_tokenizer(json_text: str, name: str):
    from tokenizers import Tokenizer

    from .folder_tokenizer import FolderTokenizer

    tok = Tokenizer.from_str(json_text)
    return FolderTokenizer(tok, tok.get_vocab_size(with_added_tokens=True), name)


def tokenizer_from_file(given: str):
    path = Path(given).expanduser()
    if given.endswith(".json") and path.is_file():
        try:
            return hf_tokenizer(path.read_text(encoding="utf-8"), f"huggingface-{path.stem}")
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
            raise MicroArchError(f"{path}: not a Hugging Face tokenizers file ({str(err).splitlines()[0]})") from None
    if given.endswith(".model") or path.is_file():
        return SentencePieceTokenizer.from_file(given)
    raise MicroArchError(f"data.tokenizer {given!r}: unknown{closest(given, list(TRAINED))}; use 'char', 'bpe', "
                         "'bytelevel', the path of a SentencePiece .model file or of a tokenizers .json file")


def train_tokenizer(cfg: DataConfig, path: Path, scans: list[Scan], plans: list[SourcePlan]):
    if cfg.tokenizer == "char":
        # every character of the corpus, held-out included, so that evaluation never meets an unknown one
        tokenizer = CharTokenizer("".join(s.chars for s in scans) + SEPARATOR)
        write_atomically(path, tokenizer.chars.encode("utf-8"))
        return tokenizer
    texts = [d for p, s in zip(plans, scans) for d in training_sample(s, p.n_train(s.n_docs, cfg.val_fraction))]
    if cfg.tokenizer == "bpe":
        write_atomically(path, train_bpe(texts, cfg.vocab_size))
    else:
        write_atomically(path, train_bytelevel(texts, cfg.vocab_size).encode("utf-8"))
    return load_cached_tokenizer(cfg, path)


# --- the whole ---------------------------------------------------------------------------------


def source_folder(root: Path, source, cfg: DataConfig, tokenizer) -> Path:
    """Where a source's shards go: a key of its documents, its split and the tokenizer (known without
    reading any text, so a prepared source is found at once)."""
    split = "works" if isinstance(source, BuiltinSource) else cfg.val_fraction
    return root / "tokens" / digest(SHARDS_FORMAT, source.description, split, tokenizer.identity)


def label_of(source) -> str:
    return getattr(source, "pattern", None) or getattr(source, "name", None) or "shakespeare"


def scan_path(root: Path, plan_: SourcePlan) -> Path:
    return root / "scans" / f"{digest(SHARDS_FORMAT, plan_.description, plan_.field)}.json"


def run_scan(cfg: DataConfig, root: Path, plan_: SourcePlan, sample_bytes: int, chars: bool, quiet: bool,
             piece_bytes: int | None = None) -> Scan:
    """The scan pass, or its cached counts (a sample is never cached). Its per-piece counts hold for one piece
    size only: `piece_bytes` asks for that one (a killed preparation's), else the settings decide."""
    run = settings(cfg, plan_.total_bytes)
    if piece_bytes is not None:
        run = Settings(run.workers, piece_bytes, run.shard_tokens)
    cached = Scan.load(scan_path(root, plan_)) if not sample_bytes else None
    if cached is not None and (cached.has_chars or not chars) and (piece_bytes is None
                                                                   or cached.piece_bytes == piece_bytes):
        return cached
    scan = scan_source(plan_.pieces(run.piece_bytes), plan_.total_bytes, run, sample_bytes, chars, plan_.files,
                       plan_.field, plan_.label, quiet)
    if scan.skipped and not quiet:  # said, never dropped silently
        from rich.console import Console

        Console(stderr=True).print(f"warning: {plan_.label}: {scan.skipped:,} of {scan.rows:,} rows have a "
                                   f"{plan_.field!r} that is not text (a number, null, empty or missing) and were "
                                   "left out", highlight=False, soft_wrap=True)
    scan.save(scan_path(root, plan_))
    return scan


def prepare_source(cfg: DataConfig, root: Path, plan_: SourcePlan, folder: Path, tokenizer, quiet: bool,
                   scan: Scan | None = None) -> dict:
    """The source's shards, going on from a killed preparation's progress: the encode pass cuts the source
    into the same pieces as the scan whose counts it uses."""
    saved = read_progress(folder)
    wanted = saved["piece_bytes"] if saved else None
    if scan is None or (wanted is not None and scan.piece_bytes != wanted):
        scan = run_scan(cfg, root, plan_, 0, False, quiet, wanted)
    n_train = plan_.n_train(scan.n_docs, cfg.val_fraction)
    run = settings(cfg, plan_.total_bytes)
    run = Settings(run.workers, scan.piece_bytes, saved["shard_tokens"] if saved else run.shard_tokens)
    meta = {"key": folder.name, "source": plan_.description, "tokenizer": tokenizer.name}
    return encode_source(folder, plan_.pieces, scan, n_train, tokenizer, run, plan_.total_bytes, plan_.label,
                         meta, quiet)


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive OS lock on <cache>/locks/<folder name> for the duration (none where fcntl is missing)."""
    locks = folder.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(locks / folder.name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def splits_of(index: dict, folder: Path, where: str):
    stream = TokenStream(open_shards(folder, index))
    train, val = stream.slice(0, index["train_end"]), stream.slice(index["val_start"], index["tokens"])
    for split, what in ((train, "training"), (val, "held-out")):
        if len(split) < 2:
            raise MicroArchError(f"{where}: the {what} split is empty ({len(split)} tokens); use more text or "
                                 "change data.val_fraction")
    return train, val


def prepare_data(cfg: DataConfig, quiet: bool = False) -> PreparedData:
    """Tokenizer plus train/held-out token ids (read-only views of the shards), from the cache when it has them."""
    root = cache_root(cfg.cache_dir)
    corpus = Corpus(cfg, root)
    path = tokenizer_path(cfg, corpus, root)
    tokenizer = load_cached_tokenizer(cfg, path)
    plans, scans = [None] * len(corpus.sources), [None] * len(corpus.sources)  # made only when text is read
    if tokenizer is None:
        plans = [plan_source(s, cfg, root, quiet) for s in corpus.sources]
        sample = cfg.tokenizer_sample_bytes if cfg.tokenizer != "char" else 0
        total = sum(p.total_bytes for p in plans)
        scans = [run_scan(cfg, root, p, max(1, round(sample * p.total_bytes / max(total, 1))) if sample else 0,
                          cfg.tokenizer == "char", quiet) for p in plans]
        tokenizer = train_tokenizer(cfg, path, scans, plans)
    trains, vals, val_bytes = [], [], []
    for source, plan_, scan in zip(corpus.sources, plans, scans):
        folder = source_folder(root, source, cfg, tokenizer)
        index = read_index(folder)
        if index is None:
            with folder_lock(folder):  # another process preparing the same source: wait, then use its shards
                index = read_index(folder)
                if index is None:
                    plan_ = plan_ or plan_source(source, cfg, root, quiet)
                    index = prepare_source(cfg, root, plan_, folder, tokenizer, quiet, scan)
        train, val = splits_of(index, folder, label_of(source))
        trains.append(train)
        vals.append(val)
        val_bytes.append(index["val_bytes"])
    separator = np.asarray(index["separator"], dtype=index["dtype"])
    train = trains[0] if len(trains) == 1 else mixture(trains, corpus.weights, separator)
    if cfg.max_tokens is not None and len(train) > cfg.max_tokens:
        train = train[:cfg.max_tokens] if isinstance(train, np.ndarray) else train.slice(0, cfg.max_tokens)
    val = join_streams(vals, separator)
    total_val_bytes = sum(val_bytes) + len(SEPARATOR.encode()) * (len(vals) - 1)
    return PreparedData(tokenizer, train, val, total_val_bytes, digest(corpus.key, tokenizer.identity))


def data_plan(cfg: DataConfig) -> dict:
    """What preparing would read and write, without reading any text: per source its files, bytes, an
    estimate of the tokens (char: one per byte; BPE: one per 4 bytes) and of the disk the shards take."""
    root = cache_root(cfg.cache_dir)
    corpus = Corpus(cfg, root)
    per_byte = {"char": 1.0}.get(cfg.tokenizer, 0.25)
    width = 2 if cfg.tokenizer == "char" or cfg.vocab_size < 2**16 else 4
    rows = []
    for source in corpus.sources:
        if isinstance(source, FileSource):
            label, files, size = source.pattern, len(source.files), sum(os.path.getsize(f) for f in source.files)
            if source.builder == "parquet":  # the text column's size, uncompressed (from the files' metadata)
                size = sum(p.size for f in source.files for p in parquet_pieces(f, source.text_field))
        elif isinstance(source, BuiltinSource):
            label, files, size = "shakespeare (built in)", 0, sum(len(d.encode()) for d in
                                                                  sum(shakespeare_documents(), []))
        else:
            label, files, size = f"{source.name} (hub, streamed)", 0, source.budget
        tokens = round(size * per_byte) if size is not None else None
        rows.append({"source": label, "files": files, "bytes": size or 0, "tokens": tokens,
                     "disk": tokens * width if tokens is not None else None})
    run = settings(cfg, sum(r["bytes"] for r in rows))
    workers = {"processes": run.workers, "piece_bytes": run.piece_bytes, "cpus": os.cpu_count() or 1,
               "memory_allows": memory_allows(cfg), "chosen": cfg.workers}
    tokenizer = cfg.tokenizer if cfg.tokenizer not in TRAINED[1:] else (
        f"{cfg.tokenizer} {cfg.vocab_size:,} (trained on at most {cfg.tokenizer_sample_bytes / 1e6:,.0f} MB)")
    return {"sources": rows, "workers": workers, "tokenizer": tokenizer, "cache": str(root)}
