"""Token ids on disk: one .bin file per split in a cache folder named by a hash of what produced them.

A folder is written under a temporary name and renamed into place, so a killed process leaves either a
complete folder or none; readers get read-only memmaps, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")


def cache_root(configured: str | None) -> Path:
    root = configured or os.environ.get("MICRO_ARCH_CACHE") or "~/.cache/micro-arch"
    return Path(root).expanduser()


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 2**16 else np.uint32


def read_shards(folder: Path) -> tuple[dict[str, np.memmap], dict] | None:
    """(split -> memmap, meta) for a complete folder, else None."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {split: np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(meta[split],))
              for split in SPLITS}
    return arrays, meta


def write_shards(folder: Path, arrays: dict[str, np.ndarray], vocab_size: int, meta: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for split in SPLITS:
            np.asarray(arrays[split]).astype(dtype, copy=False).tofile(tmp / f"{split}.bin")
        meta = {**meta, "dtype": np.dtype(dtype).name, **{s: len(arrays[s]) for s in SPLITS}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: it marks the folder complete
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same folder first; theirs is identical
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
