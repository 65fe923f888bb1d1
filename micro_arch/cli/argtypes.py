"""argparse types for the command line: numbers and output paths are checked while parsing, before any work.

argparse reports a failed type as `argument --batch-size: <message>`, so each message says what the value
must be and shows what was given. Output paths follow one rule: micro-arch creates at most the last part
of a path you name (the file, or the report folder), never its parent folders, so a typo in a path is an
error rather than a new tree of folders; the parent must exist and be writable.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "a whole number of at least 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number of at least 0")
    if not value >= 0 or value == float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def probability(text: str) -> float:
    """A share in (0, 1], such as top-p."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (above 0, at most 1), got {text}")
    return value


def can_create_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`, found by creating (and removing) one: os.access says yes to
    root everywhere, and to folders where no file can be made (/proc, a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".micro-arch-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_parent(path: Path) -> None:
    """The folder `path` goes into must exist and be writable (ArgumentTypeError otherwise)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise argparse.ArgumentTypeError(f"{str(path)!r}: the folder {str(parent)!r} does not exist; "
                                         "create it first or pick a path in an existing folder")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or not can_create_in(parent):
        raise argparse.ArgumentTypeError(f"{str(path)!r}: the folder {str(parent)!r} is not writable; "
                                         "pick a path in a folder you can write to")


def output_file(text: str) -> Path:
    """A file to write: its folder must exist and be writable; the file itself may exist (it is replaced)."""
    path = Path(text).expanduser()
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name the file to write")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file in it, e.g. {text.rstrip('/')}/out.txt")
    check_parent(path)
    return path


def output_dir(text: str) -> Path:
    """A folder to write into: it may exist; if not, its parent must exist (and the folder is created)."""
    path = Path(text).expanduser()
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name the folder to write into")
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK) or not can_create_in(path):
            raise argparse.ArgumentTypeError(f"{text!r}: the folder is not writable")
        return path
    check_parent(path)
    return path


def budget_list(text: str) -> list[float]:
    """Compute budgets: positive numbers joined by commas, e.g. 1e12,3e12,1e13."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers joined by commas, e.g. 1e12,3e12,1e13; got {text!r}") from None
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"must be positive numbers joined by commas, e.g. 1e12,3e12,1e13; got {text!r}")
    return values


def seeds_value(text: str) -> int | list[int]:
    """A number of seeds (3) or a list of seeds (1,5,9)."""
    try:
        parts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seeds (3) or seeds joined by commas (1,5,9); "
                                         f"got {text!r}") from None
    if not parts or ("," not in text and parts[0] < 1):
        raise argparse.ArgumentTypeError(f"must be a number of seeds of at least 1, or a list; got {text!r}")
    return parts if "," in text else parts[0]
