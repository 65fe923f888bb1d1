"""Documents read piece by piece: a corpus of any size is cut into pieces of about `piece_bytes` each
(a byte range of a .txt or .jsonl file, a row group of a .parquet file, or text held inline: decompressed
data, built-in or streamed documents), and a piece is read on its own, in any process.

The documents are exactly those of the whole-file readers (datasets' text builder with sample_by=paragraph:
the text split at every "\\n\\n", left to right, after universal newlines, empty paragraphs dropped; a
.jsonl line's text field; a parquet column), so cutting a file into pieces changes nothing: a .txt file is
cut only after a whole run of blank lines (an even number of newlines, so the split is the same either
side), a .jsonl file after a newline.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
from dataclasses import dataclass, field

from micro_arch.errors import MicroArchError

COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
NEWLINE_RUN = re.compile(rb"(?:\r\n|\r|\n){2,}")
NEWLINE_UNIT = re.compile(rb"\r\n|\r|\n")
READ_AHEAD = 1 << 20


@dataclass(frozen=True)
class Piece:
    """One unit of reading: `kind` is 'text', 'json' or 'parquet' (a file's byte range [start, end) or
    row group `start`), or 'docs' (documents in `data`); `data` holds the bytes of a decompressed piece."""

    file: str
    kind: str
    start: int = 0
    end: int = 0
    size: int = 0  # bytes of text, about (parquet: the column's uncompressed size)
    field: str = "text"
    data: bytes | tuple[str, ...] | None = None


@dataclass
class Read:
    """A piece's documents and what was seen on the way."""

    docs: list[str]
    rows: int = 0  # records (lines, rows); paragraphs for text
    not_text: int = 0  # records whose text field is not a non-empty string (skipped)
    no_field: int = 0  # records without the text field
    columns: list[str] = field(default_factory=list)  # a few of the keys seen, for the error message
    blank: bool = True  # nothing but whitespace in the piece


# --- planning ---------------------------------------------------------------------------------


def plan(files: list[str], builder: str, text_field: str, piece_bytes: int):
    """The pieces of `files` in order (lazily: compressed files are decompressed as they are planned)."""
    for path in files:
        if builder == "parquet":
            yield from parquet_pieces(path, text_field)
        elif path.lower().endswith(tuple(COMPRESSED)) or path.lower().endswith(".zst"):
            yield from compressed_pieces(path, builder, text_field, piece_bytes)
        elif builder == "json" and not path.lower().endswith(".jsonl") and starts_with_bracket(path):
            yield Piece(path, "json", 0, os.path.getsize(path), os.path.getsize(path), text_field)
        else:
            yield from range_pieces(path, builder, text_field, piece_bytes)


def starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"[")


def cut_after(data: bytes, builder: str, at: int, final: bool) -> int | None:
    """The first place at or after `at` where `data` may be cut (see the module docstring), or None.
    data[at - 1] is context: a run of newlines already under way at `at` is passed over (where its pairs of
    newlines fall depends on where it began)."""
    if builder == "json":
        i = data.find(b"\n", at)
        return None if i < 0 else i + 1
    for run in NEWLINE_RUN.finditer(data, at):
        if run.start() == at and at > 0 and data[at - 1:at] in (b"\r", b"\n"):
            continue
        if run.end() == len(data) and not final:
            return None  # the run may go on past the end of what was read
        units = NEWLINE_UNIT.findall(run.group())
        return run.start() + sum(len(u) for u in units[: 2 * (len(units) // 2)])
    return None


def range_pieces(path: str, builder: str, text_field: str, piece_bytes: int):
    size = os.path.getsize(path)
    start = 0
    with open(path, "rb") as f:
        while start < size:
            end, target = size, start + piece_bytes
            if target < size:
                f.seek(target - 1)  # one byte of context before the target
                window, offset, at = b"", target - 1, 1
                while True:
                    more = f.read(READ_AHEAD)
                    window += more
                    cut = cut_after(window, builder, at, final=not more)
                    if cut is not None or not more:
                        end = offset + cut if cut is not None else size
                        break
                    keep = max(len(window) - 64, 0)  # search on from near the end (a run may go on)
                    window, offset, at = window[keep:], offset + keep, max(1, len(window) - keep - 64)
            yield Piece(path, builder, start, end, end - start, text_field)
            start = end


def compressed_pieces(path: str, builder: str, text_field: str, piece_bytes: int):
    if path.lower().endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise MicroArchError(f"{path}: reading .zst needs the zstandard package (pip install zstandard), "
                                 "or decompress the file") from None
        opener = lambda p: zstandard.open(p, "rb")  # noqa: E731
    else:
        opener = COMPRESSED[os.path.splitext(path.lower())[1]]
    buffer, offset = b"", 0  # offset: where `buffer` starts in the decompressed stream
    try:
        with opener(path) as f:
            while True:
                more = f.read(piece_bytes)
                buffer += more
                while len(buffer) > piece_bytes:
                    cut = cut_after(buffer, builder, piece_bytes, final=not more)
                    if cut is None:
                        if more:
                            break  # read on: the next cut lies further
                        cut = len(buffer)
                    yield Piece(path, builder, offset, offset + cut, cut, text_field, buffer[:cut])
                    buffer, offset = buffer[cut:], offset + cut
                if not more:
                    if buffer:
                        yield Piece(path, builder, offset, offset + len(buffer), len(buffer), text_field, buffer)
                    return
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise MicroArchError(f"{path}: cannot decompress ({err}); check that the file is whole") from None


def parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise MicroArchError(f"{path}: not a readable parquet file ({first_line(err)}); check that it is whole "
                             "(a partly downloaded file), or leave it out of data.source") from None


def parquet_pieces(path: str, text_field: str):
    meta = parquet_file(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if text_field not in names:
        raise MicroArchError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set "
                             "data.text_field to the one that holds the text")
    column = names.index(text_field)
    for i in range(meta.num_row_groups):
        size = meta.row_group(i).column(column).total_uncompressed_size
        yield Piece(path, "parquet", i, i + 1, size, text_field)


# --- reading ----------------------------------------------------------------------------------


def read(piece: Piece) -> Read:
    if piece.kind == "docs":
        docs = [d for d in piece.data if d]
        return Read(docs, len(piece.data), blank=not any(d.strip() for d in docs))
    if piece.kind == "parquet":
        return read_parquet(piece)
    data = piece.data if piece.data is not None else read_bytes(piece)
    text = decode(data, piece)
    if piece.kind == "text":
        text = text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
        docs = [p for p in text.split("\n\n") if p]
        return Read(docs, len(docs), blank=not text.strip())
    return read_json(text, piece)


RUNS = re.compile(rb"\n\n(?:\n\n)+")  # an even number of newlines, 4 or more: leftmost-longest in a run


def joined_utf8(piece: Piece) -> tuple[bytes, int] | None:
    """(a .txt piece's documents joined by the blank line, as UTF-8, their number), without splitting or decoding
    the text: what splitting at every "\\n\\n", dropping empty paragraphs and joining does to it is done to its
    runs of newlines instead (a run of 4 or more in the middle becomes 2, or 3 when odd; at either end an even
    run goes, an odd one keeps a newline of its own). Not yet checked to be UTF-8: see `text_of`. None for
    other pieces."""
    if piece.kind != "text":
        return None
    data = piece.data if piece.data is not None else read_bytes(piece)
    if b"\x00" in data:
        decode(data, piece)  # raises: a binary file
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data
    first = NOT_NEWLINE.search(data)
    if first is None:  # nothing but newlines: one document "\n" when their number is odd
        return (b"\n", 1) if len(data) % 2 else (b"", 0)
    lead, trail = first.start(), trailing_newlines(data)
    tail = b"\n" * trail if trail < 2 else (b"\n\n\n" if trail % 2 else b"")
    body = RUNS.sub(b"\n\n", memoryview(data)[lead:len(data) - trail])  # one copy, not three
    joined = body if not (lead % 2 or tail) else b"".join([b"\n" if lead % 2 else b"", body, tail])
    return joined, joined.count(b"\n\n") + 1


NOT_NEWLINE = re.compile(rb"[^\n]")


def trailing_newlines(data: bytes) -> int:
    n = 0
    while n < len(data) and data[len(data) - 1 - n] == 10:
        n += 1
    return n


def text_of(joined: bytes, piece: Piece) -> str:
    """The text of `joined_utf8(piece)`; a clear error, naming the byte of the file, if it is not UTF-8 (the
    joining only drops and changes newlines, so the file's own bytes fail exactly when these do)."""
    try:
        return joined.decode("utf-8")
    except UnicodeDecodeError:
        decode(piece.data if piece.data is not None else read_bytes(piece), piece)
        raise


def read_bytes(piece: Piece) -> bytes:
    with open(piece.file, "rb") as f:
        f.seek(piece.start)
        return f.read(piece.end - piece.start)


def decode(data: bytes, piece: Piece) -> str:
    fix = "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8) or leave it out of data.source"
    nul = data.find(b"\x00")
    try:
        text = data[:nul].decode("utf-8") if nul >= 0 else data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MicroArchError(f"{piece.file}: not UTF-8 text: byte {piece.start + err.start} (0x{data[err.start]:02x}) "
                             f"cannot be decoded; {fix}") from None
    if nul >= 0:
        raise MicroArchError(f"{piece.file}: not UTF-8 text: byte {piece.start + nul} is NUL (0x00), so this looks "
                             f"like a binary file; {fix}")
    return text


ONE_OBJECT = "one JSON object such as {\"text\": \"...\"}"


def json_line(line: str, where: str) -> dict:
    """One line of a .jsonl file as its object; `where` (path:line) leads the one-line error otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise MicroArchError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line of a .jsonl "
                             f"file must be {ONE_OBJECT}") from None
    if not isinstance(row, dict):
        raise MicroArchError(f"{where}: a JSON {type(row).__name__}, not an object; each line of a .jsonl file "
                             f"must be {ONE_OBJECT}")
    return row


def read_json(text: str, piece: Piece) -> Read:
    out = Read([])
    if text.lstrip().startswith("[") and piece.start == 0 and not piece.file.lower().endswith(".jsonl"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise MicroArchError(f"{piece.file}: not valid JSON ({err.msg} at line {err.lineno}, column "
                                 f"{err.colno})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise MicroArchError(f"{piece.file}:item {i + 1}: a JSON {type(row).__name__}, not an object; each "
                                     f"line of a .jsonl file must be {ONE_OBJECT}")
    else:
        rows = [json_line(line, f"{piece.file}:{line_number(piece, number)}")
                for number, line in enumerate(text.split("\n")) if line.strip()]
    for row in rows:
        out.rows += 1
        value = row.get(piece.field)
        if piece.field not in row:
            out.no_field += 1
            if len(out.columns) < 20:
                out.columns.extend(k for k in row if k not in out.columns)
        elif isinstance(value, str) and value:
            out.docs.append(value)
        else:
            out.not_text += 1
    out.blank = not text.strip()
    return out


def line_number(piece: Piece, index: int) -> int:
    """The 1-based line of the piece's line `index` in its file (counted only for an error)."""
    before = 0
    if piece.data is None and piece.start:
        with open(piece.file, "rb") as f:
            left = piece.start
            while left:
                chunk = f.read(min(left, 1 << 20))
                before += chunk.count(b"\n")
                left -= len(chunk)
    return before + index + 1


def read_parquet(piece: Piece) -> Read:
    import pyarrow as pa

    source = parquet_file(piece.file)
    out = Read([])
    try:
        for batch in source.iter_batches(batch_size=8192, row_groups=[piece.start], columns=[piece.field]):
            column = batch.column(0)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise MicroArchError(f"{piece.file}: column {piece.field!r} holds {column.type}, not text; set "
                                     "data.text_field to the column that holds the text")
            values = column.to_pylist()
            out.rows += len(values)
            kept = [v for v in values if v]
            out.not_text += len(values) - len(kept)
            out.docs += kept
    except MicroArchError:
        raise
    except Exception as err:
        raise MicroArchError(f"{piece.file}: row group {piece.start} cannot be read ({first_line(err)}); check "
                             "that the file is whole, or leave it out of data.source") from None
    out.blank = not any(d.strip() for d in out.docs)
    return out


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_rows(path: str, name: str):
    """(line number, record) of a .jsonl/.json/.parquet file of records, read as a stream (a line, or a
    parquet batch, at a time); a bad line is an error naming `name` and the line. A parquet row's number is
    its place in the file; a .json array's, its place in the array."""
    if path.lower().endswith(".parquet"):
        source = parquet_file(path)
        number = 0
        for batch in source.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
        return
    if starts_with_bracket(path):
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                raise MicroArchError(f"{name} line {err.lineno}: not JSON: {err.msg} (column {err.colno})") from None
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise MicroArchError(f"{name} item {number}: a JSON {type(row).__name__}, not an object")
            yield number, row
        return
    opener = COMPRESSED.get(os.path.splitext(path.lower())[1], open)
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise MicroArchError(f"{name} line {number}: not UTF-8 text (byte {err.start} of the line, "
                                     f"0x{raw[err.start]:02x})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise MicroArchError(f"{name} line {number}: not JSON: {err.msg} (column {err.colno}); each line "
                                     "of a .jsonl file is one JSON object") from None
            if not isinstance(row, dict):
                raise MicroArchError(f"{name} line {number}: a JSON {type(row).__name__}, not an object; each "
                                     "line of a .jsonl file is one JSON object")
            yield number, row
