"""Where text comes from: the built-in corpus, local .txt/.jsonl/.parquet files or globs, or hub datasets.

Every source gives documents in a fixed order and splits them into (training, held-out). Local and hub
sources hold out the last `val_fraction` of their documents (whole documents, never random lines); a
.txt file is read as paragraphs (split at blank lines), so one file still yields many documents.
A source's `description` identifies it for the caches without reading it (paths, sizes, mtimes).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import glob
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from micro_arch.errors import MicroArchError

from .corpus import archive_digest, shakespeare_documents
from .documents import json_line

BUILTIN = "shakespeare"
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def file_format(path: str) -> str | None:
    """The datasets builder for a file name ('text', 'json', 'parquet'), or None for other names."""
    name = path.lower()
    for ext in COMPRESSION:
        name = name.removesuffix(ext)
    return FORMATS.get(os.path.splitext(name)[1])


def looks_local(source: str) -> bool:
    return (any(c in source for c in "*?[") or file_format(source) is not None
            or source.startswith(("/", ".", "~")) or os.path.exists(source))


def hold_out(docs: list[str], val_fraction: float, where: str) -> tuple[list[str], list[str]]:
    if not docs:
        raise MicroArchError(f"{where}: the corpus is empty (no text); point data.source at files with text "
                             "in them (and data.text_field at the column that holds it)")
    n_val = max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise MicroArchError(f"{where}: only {len(docs)} document(s), too few to hold out whole documents "
                             f"(data.val_fraction={val_fraction}) and still train; add text (a .txt file is split "
                             "into documents at blank lines) or lower data.val_fraction")
    return docs[:-n_val], docs[-n_val:]


class BuiltinSource:
    @property
    def description(self) -> str:
        return f"{BUILTIN}:works-v1:{archive_digest()}"

    def split(self, val_fraction: float) -> tuple[list[str], list[str]]:
        return shakespeare_documents()  # a fixed split of whole works, whatever val_fraction says


@dataclass
class FileSource:
    pattern: str
    files: list[str]
    builder: str
    text_field: str
    cache_dir: Path

    @property
    def description(self) -> str:
        stats = [(f, st.st_size, st.st_mtime_ns) for f in self.files for st in [os.stat(f)]]
        return f"files:{self.builder}:{self.text_field}:{stats}"

    def split(self, val_fraction: float) -> tuple[list[str], list[str]]:
        return hold_out(self.documents(), val_fraction, self.pattern)

    def documents(self, option: str = "data.source", field_option: str = "data.text_field") -> list[str]:
        """Every document of the files, in order; a file that cannot be read says why, naming `option`
        (and `field_option` when the text column is missing)."""
        import datasets

        if self.builder in ("text", "json"):
            for file in self.files:
                check_text_file(file, option=option)
        options = {"sample_by": "paragraph"} if self.builder == "text" else {}
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        log, level = logging.getLogger("datasets"), logging.getLogger("datasets").level
        log.setLevel(logging.CRITICAL)  # its log lines would repeat the error below, less clearly
        try:
            table = datasets.load_dataset(self.builder, data_files=self.files, split="train",
                                          cache_dir=str(self.cache_dir), **options)
        except Exception as err:  # datasets wraps parse errors in several types; all mean "cannot read"
            if self.builder == "json":
                for file in self.files:
                    check_json_lines(file)
            cause = root_cause(err)
            raise MicroArchError(f"{self.pattern}: cannot read as {self.builder} ({type(cause).__name__}: "
                                 f"{first_line(cause)}); check that the file is valid {self.builder}") from None
        finally:
            log.setLevel(level)
            if was_enabled:
                datasets.enable_progress_bars()
        return column_texts(table, self.text_field, self.pattern, field_option)


@dataclass
class HubSource:
    name: str
    text_field: str

    @property
    def description(self) -> str:
        return f"hub:{self.name}:{self.text_field}"

    def split(self, val_fraction: float) -> tuple[list[str], list[str]]:
        import datasets

        offline = hub_offline_reason()
        try:
            with offline_mode(offline is not None):  # offline, only the local cache is tried: no retries
                loaded = datasets.load_dataset(self.name)
        except Exception as err:
            raise hub_error(self.name, err, offline) from None
        split = "train" if "train" in loaded else next(iter(loaded))
        return hold_out(column_texts(loaded[split], self.text_field, self.name), val_fraction, self.name)


def column_texts(table, text_field: str, where: str, field_option: str = "data.text_field") -> list[str]:
    if text_field not in table.column_names:
        raise MicroArchError(f"{where}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                             f"set {field_option} to the one that holds the text")
    texts, skipped, first = [], collections.Counter(), None
    for row, value in enumerate(table[text_field], 1):
        if isinstance(value, str):
            if value:
                texts.append(value)
        else:  # a number, null, a missing field, a list or a mapping: not text, and said so below
            skipped[_kind(value)] += 1
            first = first or row
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items(), key=lambda kn: (-kn[1], kn[0])))
        print(f"warning: {where}: {sum(skipped.values())} of {row} rows have a {text_field!r} that is not text "
              f"({kinds}; the first at row {first}) and were left out", file=sys.stderr)
    return texts


def _kind(value) -> str:
    if value is None:
        return "null or missing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    return "list" if isinstance(value, list) else "mapping" if isinstance(value, dict) else type(value).__name__


def local_files(pattern: str) -> list[str]:
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        files = [str(p) for p in sorted(Path(expanded).iterdir()) if p.is_file() and file_format(p.name)]
    else:
        files = sorted(glob.glob(expanded, recursive=True))
    if not files:
        what = "no such file" if pattern == glob.escape(pattern) else "the glob matches no files"
        raise MicroArchError(f"{pattern}: {what}; point data.source at an existing .txt, .jsonl or .parquet "
                             "file or glob, or use 'shakespeare' for the built-in corpus")
    return [os.path.abspath(f) for f in files]


def resolve_source(source: str, text_field: str, cache_dir: Path):
    if source == BUILTIN:
        return BuiltinSource()
    if not looks_local(source):
        return HubSource(source, text_field)
    files = local_files(source)
    builders = {file_format(f) for f in files}
    if None in builders:
        raise unsupported_kind(source, [f for f in files if file_format(f) is None])
    if len(builders) > 1:
        names = ", ".join(os.path.basename(f) for f in files[:5])
        raise MicroArchError(f"{source}: needs files of one kind (.txt, .jsonl or .parquet), matched {names}; use "
                             "one source per kind in a mixture (data.source: [{source: ..., weight: ...}, ...])")
    return FileSource(source, files, builders.pop(), text_field, cache_dir / "hf-datasets")


def unsupported_kind(source: str, files: list[str]) -> MicroArchError:
    """A file whose name says no kind this reads (README.md, data.csv): which, and what is read."""
    kinds = " or ".join(sorted({repr(os.path.splitext(f)[1]) if os.path.splitext(f)[1] else "extension-less"
                                for f in files}))
    names = ", ".join(os.path.basename(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    where = source if os.path.abspath(os.path.expanduser(source)) == files[0] else f"{source}: {names}"
    return MicroArchError(
        f"{where}: micro-arch does not read {kinds} files; it reads .txt (plain text), .jsonl/.json and .parquet "
        "(also .gz, .bz2, .xz or .zst compressed); to read another text file as plain text, copy or link it to "
        "a name ending in .txt")


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception: datasets wraps the real complaint in DatasetGenerationError."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def check_text_file(path: str, chunk_size: int = 1 << 20, option: str = "data.source") -> None:
    """An empty (or whitespace-only) file, or one that is not UTF-8 text, is an error that says which,
    with the offset of the first bad byte. Compressed files are left to the reader."""
    if path.lower().endswith(COMPRESSION):
        return
    decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True
    fix = f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8) or leave it out of {option}"
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = decoder.getstate()[0]
            data, start = pending + chunk, offset - len(pending)  # the bytes this decode looks at
            nul = data.find(b"\x00")
            try:
                text = decoder.decode(chunk, final=not chunk)
                bad = -1
            except UnicodeDecodeError as err:
                text, bad = "", err.start
            if nul != -1 and (bad == -1 or nul < bad):
                raise MicroArchError(f"{path}: not UTF-8 text: byte {start + nul} is NUL (0x00), so this looks "
                                     f"like a binary file; {fix}")
            if bad != -1:
                raise MicroArchError(f"{path}: not UTF-8 text: byte {start + bad} (0x{data[bad]:02x}) cannot be "
                                     f"decoded; {fix}")
            blank = blank and not text.strip()
            if not chunk:
                break
            offset += len(chunk)
    if blank:
        what = "0 bytes" if offset == 0 else "only whitespace"
        raise MicroArchError(f"{path}: the file is empty ({what}); put text in it, or leave it out of {option}")


def check_json_lines(path: str) -> None:
    """After a failed read: the first line of a .jsonl file that is not a JSON object, as path:line."""
    if not path.lower().endswith(".jsonl"):  # a .json file may be one document over many lines
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                json_line(line, f"{path}:{number}")


def hub_offline_reason() -> str | None:
    """Why the hub cannot be reached now (offline mode, or no connection within 3 s), or None."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the hub may be reachable through the proxy only: let the hub client try
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        return f"no connection to {host}:{port}: {err.strerror or err}"
    return None


@contextlib.contextmanager
def offline_mode(on: bool):
    """Offline mode for datasets and huggingface_hub for the duration (they read it at import)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if on:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def hub_error(name: str, err: Exception, offline: str | None) -> MicroArchError:
    """One line for a hub dataset that could not be loaded: the hub's own answer, or no connection and no cache."""
    if offline is None and not isinstance(err, (ConnectionError, OSError, TimeoutError)):
        return MicroArchError(f"data.source {name!r}: not a file here, and the hub says: {first_line(err)}")
    why = offline or first_line(err)
    return MicroArchError(
        f"data.source {name!r}: could not reach the Hugging Face hub ({why}) and the dataset is not in the local "
        "cache; offline, point data.source at local files instead: a .txt, .jsonl or .parquet file or a glob such "
        "as 'data/*.jsonl', or 'shakespeare' for the built-in corpus")
