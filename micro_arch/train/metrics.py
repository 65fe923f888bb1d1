"""metrics.csv: one row per logged step, columns added as blocks report new statistics."""

from __future__ import annotations

import csv
from pathlib import Path

BASE_COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec", "memory_mb", "elapsed_s"]


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        if resume_step is not None and path.is_file():
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if _step(r) is not None and _step(r) <= resume_step]
        self.columns = list(BASE_COLUMNS)
        self._written = 0  # rows already in the file as they are now; the rest can be appended
        for row in self.rows:
            self._add_columns(row)

    def _add_columns(self, row: dict) -> None:
        self.columns += [k for k in row if k not in self.columns]

    def log(self, row: dict) -> None:
        """Add a row (merging into the last row when it is the same step): appended to the file, which is
        rewritten whole only when a new column appears, a row changes, or on the first write."""
        row = {k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()}
        rewrite = not self._written or any(k not in self.columns for k in row)
        if self.rows and str(self.rows[-1]["step"]) == str(row["step"]):
            self.rows[-1].update(row)
            rewrite = True
        else:
            self.rows.append(row)
        self._add_columns(row)
        if not rewrite:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, restval="").writerows(self.rows[self._written:])
            self._written = len(self.rows)
            return
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
        self._written = len(self.rows)


def _step(row: dict) -> int | None:
    """The row's step, or None for a line cut short by a kill during a write."""
    try:
        return int(row["step"])
    except (TypeError, ValueError):
        return None
