"""JSON-lines records for the later stages (conversations, preference pairs), read with `datasets`.

Files are read one at a time so that an error can name the file and the line of the bad record (one JSON
object per line; blank lines are skipped and counted). A source is anything the data section accepts as local files:
a .jsonl/.json/.parquet file, a glob, or a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from micro_arch.errors import MicroArchError


def read_records(source: str, cache_dir: Path, what: str) -> list[tuple[str, dict]]:
    """[(where, record), ...] in file order, `where` like 'chat.jsonl line 12'."""
    import datasets

    from micro_arch.data.sources import file_format, local_files

    from .builtin_chat import builtin_file, is_builtin

    files = local_files(builtin_file(source, cache_dir) if is_builtin(source) else source)
    bad = [f for f in files if file_format(f) not in ("json", "parquet")]
    if bad:
        raise MicroArchError(f"{source}: {what} are read from JSON lines (.jsonl) or .parquet files, not "
                             f"{os.path.basename(bad[0])}")
    files = [f for f in files if os.path.getsize(f) > 0]  # datasets cannot read an empty file
    records = []
    was_enabled, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are ours to word, in one line
    try:
        for path in files:
            try:
                table = datasets.load_dataset(file_format(path), data_files=[path], split="train",
                                              cache_dir=str(cache_dir / "hf-datasets"))
            except Exception as err:  # datasets wraps parse errors in several types; all mean "cannot read"
                bad = first_bad_line(path) if path.endswith(".jsonl") else None
                if bad:
                    raise MicroArchError(f"{os.path.basename(path)} {bad}; each line of a .jsonl file is one JSON "
                                         "object") from None
                first = str(err).splitlines()[0] if str(err) else ""
                raise MicroArchError(f"{path}: cannot read {what} as JSON lines ({type(err).__name__}: {first})"
                                     ) from None
            name = os.path.basename(path)
            rows = table.to_list()
            records += [(f"{name} line {n}", row) for n, row in zip(record_lines(path, len(rows)), rows)]
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()
    if not records:
        raise MicroArchError(f"{source}: no {what} in it")
    return records


def record_lines(path: str, n: int):
    """The line number of each of a file's n records: a .jsonl file's non-blank lines (datasets skips blank
    ones), else 1..n."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            found = [i for i, line in enumerate(f, 1) if line.strip()]
        if len(found) == n:
            return found
    return range(1, n + 1)


def first_bad_line(path: str) -> str | None:
    """Where a JSON-lines file stops being one JSON object per line, e.g. "line 4: Expecting ',' delimiter
    (column 81)", or None when every line is one (datasets' own errors do not say where)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                return f"line {i}: not JSON: {err.msg} (column {err.colno})"
            if not isinstance(row, dict):
                return f"line {i}: a JSON {type(row).__name__}, not an object"
    return None


def split_records(records: list, val_source_records: list | None, val_fraction: float, source: str
                  ) -> tuple[list, list]:
    """(training, held-out): the held-out file when one is given, else the last val_fraction of the records."""
    if val_source_records is not None:
        return records, val_source_records
    n_val = max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise MicroArchError(f"{source}: only {len(records)} record(s), too few to hold some out and still "
                             "train; add records, lower data.val_fraction, or set data.val_source")
    return records[:-n_val], records[-n_val:]
