"""JSON-lines records for the later stages (conversations, preference pairs), read as a stream, a line at a time
(micro_arch.data.documents.read_rows), so that an error names the file and the line of the bad record (one JSON
object per line; blank lines are skipped and counted). A source is anything the data section accepts as local files
(a .jsonl/.json/.parquet file, a glob, or a folder), built-in chat data (shakespeare-chat:*), or a hub dataset
of such records (streamed into the cache the first time: micro_arch.data.hub.hub_records).
"""

from __future__ import annotations

import os
from pathlib import Path

from micro_arch.errors import MicroArchError


def read_records(source: str, cache_dir: Path, what: str) -> list[tuple[str, dict]]:
    """[(where, record), ...] in file order, `where` like 'chat.jsonl line 12'."""
    from micro_arch.data.documents import read_rows
    from micro_arch.data.hub import hub_records
    from micro_arch.data.sources import file_format, local_files, looks_local

    from .builtin_chat import builtin_file, is_builtin

    if is_builtin(source):
        files = [builtin_file(source, cache_dir)]
    elif looks_local(source):
        files = local_files(source)
    else:  # a hub dataset, streamed into the cache the first time
        files = hub_records(source, Path(cache_dir))
    bad = [f for f in files if file_format(f) not in ("json", "parquet")]
    if bad:
        raise MicroArchError(f"{source}: {what} are read from JSON lines (.jsonl) or .parquet files, not "
                             f"{os.path.basename(bad[0])}")
    records = []
    for path in files:
        if os.path.getsize(path) == 0:
            continue
        name = os.path.basename(path)
        records += [(f"{name} line {n}", row) for n, row in read_rows(path, name)]
    if not records:
        raise MicroArchError(f"{source}: no {what} in it")
    return records


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
