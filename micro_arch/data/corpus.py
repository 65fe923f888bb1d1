"""The built-in corpus: Shakespeare's 42 works (Globe edition), shipped as corpora/shakespeare.tar.xz.

The split is fixed forever so that results stay comparable: the works sorted by file name, a work
goes to training while the characters before it are under 90% of the total, the rest are held out
(whole works, so no held-out line appears in training). Works are joined with SEPARATOR.
"""

from __future__ import annotations

import hashlib
import tarfile
from functools import cache
from pathlib import Path

from micro_arch.errors import MicroArchError

ARCHIVE = Path(__file__).parent / "corpora" / "shakespeare.tar.xz"
TRAIN_SHARE = 0.9
SEPARATOR = "\n\n"  # between documents, in every source: a blank line, as between paragraphs


def _archive() -> Path:
    if not ARCHIVE.is_file():
        raise MicroArchError(f"{ARCHIVE}: the built-in Shakespeare corpus is missing from the install; "
                             "rebuild it with `python scripts/make_shakespeare_corpus.py` or reinstall micro-arch")
    return ARCHIVE


@cache
def archive_digest() -> str:
    return hashlib.sha256(_archive().read_bytes()).hexdigest()[:16]


def read_works() -> list[tuple[str, str]]:
    """(file name, text) for every work, sorted by file name."""
    with tarfile.open(_archive(), "r:xz") as tar:
        works = [(m.name, tar.extractfile(m).read().decode("utf-8")) for m in tar.getmembers() if m.isfile()]
    return sorted(works)


def split_works(works: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training works, held-out works) by the fixed rule in the module docstring."""
    total = sum(len(text) for _, text in works)
    train, held_out, before = [], [], 0
    for work in works:
        (train if before < TRAIN_SHARE * total and not held_out else held_out).append(work)
        before += len(work[1])
    return train, held_out


def shakespeare_documents() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts), one string per work."""
    train, held_out = split_works(read_works())
    return [text for _, text in train], [text for _, text in held_out]
