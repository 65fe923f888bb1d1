"""The built-in chat data: conversations (SFT) and preference pairs (DPO) from the shipped Shakespeare corpus,
built on first use into the cache, so the shakespeare-sft and -dpo experiments need no manual step.

    data.source: shakespeare-chat:sft_train     val_source: shakespeare-chat:sft_val
    data.source: shakespeare-chat:dpo_train     val_source: shakespeare-chat:dpo_val

Split by whole works exactly as the pretraining data (micro_arch/data/corpus.py); how speeches become
conversations and pairs: micro_arch/stages/dialogues.py. scripts/make_shakespeare_dialogues.py writes the same
files to a folder of one's choice (other clip lengths, another seed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from micro_arch.errors import MicroArchError, closest

PREFIX = "shakespeare-chat:"
NAMES = ("sft_train", "sft_val", "dpo_train", "dpo_val")
DEFAULTS = {"max_user_chars": 120, "max_answer_chars": 100, "seed": 0}
VERSION = "v1"  # bump when dialogues.py changes what it builds from the same corpus


def is_builtin(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def write_jsonl(path: Path, rows) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def build(out: Path, max_user_chars: int, max_answer_chars: int, seed: int) -> dict[str, tuple[int, int, int]]:
    """The four files in `out`; per split (works, conversations, pairs)."""
    from micro_arch.data.corpus import read_works, split_works

    from .dialogues import exchanges, preference_pairs

    counts = {}
    for split, works in zip(("train", "val"), split_works(read_works())):
        items = exchanges(works, max_user_chars, max_answer_chars)
        n_conv = write_jsonl(out / f"sft_{split}.jsonl", [{"messages": ex.messages()} for ex in items])
        n_pairs = write_jsonl(out / f"dpo_{split}.jsonl", preference_pairs(items, seed))
        counts[split] = (len(works), n_conv, n_pairs)
    return counts


def builtin_file(source: str, cache_dir: Path) -> str:
    """The JSONL file of a built-in chat source, built into the cache the first time."""
    from micro_arch.data.corpus import archive_digest

    name = source[len(PREFIX):]
    if name not in NAMES:
        raise MicroArchError(f"data.source {source!r}: no such built-in chat data{closest(name, list(NAMES))}; "
                             f"use one of {', '.join(PREFIX + n for n in NAMES)}")
    folder = Path(cache_dir) / "builtin" / f"shakespeare-chat-{VERSION}-{archive_digest()}"
    if not (folder / "DONE").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-chat.", dir=folder.parent))
        try:
            build(tmp, **DEFAULTS)
            (tmp / "DONE").write_text("")
            try:
                tmp.rename(folder)
            except OSError:  # another process built it first; theirs is identical
                if not (folder / "DONE").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder / f"{name}.jsonl")
