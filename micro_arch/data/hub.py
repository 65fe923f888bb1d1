"""A hub dataset streamed (datasets' streaming mode) up to a token budget, kept as local JSON-lines parts.

    data.source: HuggingFaceFW/fineweb-edu     data.max_tokens: 1_000_000_000

Documents are streamed in order and written to <cache>/hub/<key>/part-*.jsonl until they hold about
max_tokens / (1 - val_fraction) tokens (char: one per character; BPE-like tokenizers: one per
BYTES_PER_TOKEN bytes, so with denser text the budget is met with fewer documents and with sparser text the
training split ends a little short of it); the rest of the dataset is never downloaded. The parts are then
prepared like local files (scan, encode, shards), the last val_fraction of their documents held out.
Without max_tokens the whole dataset is streamed. Offline, a dataset already in the local datasets cache is
read from there; any other is the one-line error of HubSource.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from micro_arch.errors import MicroArchError

from .shards import DONE, digest
from .sources import HubSource, hub_error, hub_offline_reason, offline_mode

BYTES_PER_TOKEN = 4.0  # what a BPE token of English text spans, about (GPT-2 and SentencePiece vocabularies)
PART_BYTES = 64 << 20


class StreamedHub:
    """A HubSource read in streaming mode up to a budget; its description includes the budget."""

    def __init__(self, source: HubSource, max_tokens: int | None, tokenizer: str, val_fraction: float,
                 records: bool = False):
        self.source, self.name, self.text_field, self.records = source, source.name, source.text_field, records
        self.per_char = tokenizer == "char"
        wanted = None if max_tokens is None else max_tokens / (1 - val_fraction)
        self.budget = None if wanted is None else int(wanted * (1 if self.per_char else BYTES_PER_TOKEN))

    @property
    def description(self) -> str:
        if self.records:
            return f"hub:{self.name}:records"
        unit = "chars" if self.per_char else "bytes"
        return f"{self.source.description}:stream:{self.budget or 'all'} {unit}"

    def files(self, root: Path, quiet: bool = False) -> list[str]:
        """The local parts, streamed the first time."""
        folder = root / "hub" / digest(self.description)
        if not (folder / DONE).is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                self._stream_into(tmp, quiet)
                (tmp / DONE).write_text("")
                try:
                    tmp.rename(folder)
                except OSError:  # another process streamed it first
                    if not (folder / DONE).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return [str(p) for p in sorted(folder.glob("part-*.jsonl"))]

    def _rows(self):
        import datasets

        offline = hub_offline_reason()
        try:
            if offline is None:
                loaded = datasets.load_dataset(self.name, streaming=True)
            else:  # only the local cache can answer: read it from there (whole, as it is on disk already)
                with offline_mode(True):
                    loaded = datasets.load_dataset(self.name)
        except Exception as err:
            raise hub_error(self.name, err, offline) from None
        split = "train" if "train" in loaded else next(iter(loaded))
        return iter(loaded[split])

    def _stream_into(self, folder: Path, quiet: bool) -> None:
        from .stream import Meter

        meter = Meter(f"streaming {self.name}", self.budget or 0, quiet)
        taken, part, size, out = 0, 0, 0, None
        try:
            for row in self._rows():
                if self.records:  # conversations or preference pairs: every record whole
                    if out is None or size >= PART_BYTES:
                        if out is not None:
                            out.close()
                        out, size, part = open(folder / f"part-{part:05d}.jsonl", "w", encoding="utf-8"), 0, part + 1
                    line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
                    out.write(line)
                    size += len(line)
                    taken += len(line)
                    meter.advance(len(line))
                    continue
                if self.text_field not in row:
                    raise MicroArchError(f"{self.name}: no column {self.text_field!r} (columns: "
                                         f"{', '.join(row)}); set data.text_field to the one that holds the text")
                text = row[self.text_field]
                if not isinstance(text, str) or not text:
                    continue
                if out is None or size >= PART_BYTES:
                    if out is not None:
                        out.close()
                    out, size, part = open(folder / f"part-{part:05d}.jsonl", "w", encoding="utf-8"), 0, part + 1
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                size += len(line)
                amount = len(text) if self.per_char else len(text.encode("utf-8"))
                taken += amount
                meter.advance(amount)
                if self.budget is not None and taken >= self.budget:
                    break
        finally:
            if out is not None:
                out.close()
            meter.close(quiet=True)
        if not taken:
            what = "no records" if self.records else f"no text in column {self.text_field!r}"
            raise MicroArchError(f"{self.name}: {what}")


def hub_records(name: str, root: Path, quiet: bool = False) -> list[str]:
    """A hub dataset of conversations or preference pairs (sft, dpo), streamed whole into local JSON-lines parts
    the first time (offline: from the local datasets cache, or the one-line error)."""
    return StreamedHub(HubSource(name, "text"), None, "char", 0.5, records=True).files(root, quiet)
