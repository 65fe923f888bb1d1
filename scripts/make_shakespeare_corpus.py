"""Rebuild micro_arch/data/corpora/shakespeare.tar.xz from the 42 Globe-edition files (*_gut.txt).

    python scripts/make_shakespeare_corpus.py [SOURCE_DIR]

SOURCE_DIR defaults to ../shared/data/shakespeare beside the checkout (see its README.md for where the
texts come from). The archive is byte-for-byte reproducible: members sorted by name, fixed mtimes and
owners, and the same xz preset, so a rebuild from the same texts gives the same file.
"""

from __future__ import annotations

import io
import lzma
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "shakespeare"
TARGET = ROOT / "micro_arch" / "data" / "corpora" / "shakespeare.tar.xz"
EXPECTED_FILES = 42


def build(source: Path, target: Path) -> None:
    files = sorted(source.glob("*_gut.txt"))
    if len(files) != EXPECTED_FILES:
        sys.exit(f"{source}: expected {EXPECTED_FILES} *_gut.txt files, found {len(files)}")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            data.decode("utf-8")  # fail here, not at training time, on a damaged file
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(lzma.compress(raw.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(target)
    print(f"{target}: {len(files)} works, {raw.tell():,} bytes -> {target.stat().st_size:,} bytes")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE, TARGET)
