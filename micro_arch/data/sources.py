"""Where text comes from: the built-in corpus, local .txt/.jsonl/.parquet files or globs, or hub datasets.

Every source gives documents in a fixed order and splits them into (training, held-out). Local and hub
sources hold out the last `val_fraction` of their documents (whole documents, never random lines); a
.txt file is read as paragraphs (split at blank lines), so one file still yields many documents.
A source's `description` identifies it for the caches without reading it (paths, sizes, mtimes).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from micro_arch.errors import MicroArchError

from .corpus import archive_digest, shakespeare_documents

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
        import datasets

        options = {"sample_by": "paragraph"} if self.builder == "text" else {}
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            table = datasets.load_dataset(self.builder, data_files=self.files, split="train",
                                          cache_dir=str(self.cache_dir), **options)
        except Exception as err:  # datasets wraps parse errors in several types; all mean "cannot read"
            raise MicroArchError(f"{self.pattern}: cannot read as {self.builder} ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''})") from None
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        return hold_out(column_texts(table, self.text_field, self.pattern), val_fraction, self.pattern)


@dataclass
class HubSource:
    name: str
    text_field: str

    @property
    def description(self) -> str:
        return f"hub:{self.name}:{self.text_field}"

    def split(self, val_fraction: float) -> tuple[list[str], list[str]]:
        import datasets

        try:
            loaded = datasets.load_dataset(self.name)
        except (ConnectionError, OSError, TimeoutError) as err:
            raise MicroArchError(
                f"data.source {self.name!r}: could not reach the Hugging Face hub ({err}); offline, point "
                "data.source at local files instead: a .txt, .jsonl or .parquet file or a glob such as "
                "'data/*.jsonl', or 'shakespeare' for the built-in corpus") from None
        except Exception as err:
            raise MicroArchError(f"data.source {self.name!r}: not a file here, and the hub says: "
                                 f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        split = "train" if "train" in loaded else next(iter(loaded))
        return hold_out(column_texts(loaded[split], self.text_field, self.name), val_fraction, self.name)


def column_texts(table, text_field: str, where: str) -> list[str]:
    if text_field not in table.column_names:
        raise MicroArchError(f"{where}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                             "set data.text_field to the one that holds the text")
    return [t for t in table[text_field] if isinstance(t, str) and t]


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
    if None in builders or len(builders) > 1:
        names = ", ".join(os.path.basename(f) for f in files[:5])
        raise MicroArchError(f"{source}: needs files of one kind (.txt, .jsonl or .parquet), matched {names}; use "
                             "one source per kind in a mixture (data.source: [{source: ..., weight: ...}, ...])")
    return FileSource(source, files, builders.pop(), text_field, cache_dir / "hf-datasets")
