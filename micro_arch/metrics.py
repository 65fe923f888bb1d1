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
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.columns = list(BASE_COLUMNS)
        for row in self.rows:
            self._add_columns(row)

    def _add_columns(self, row: dict) -> None:
        self.columns += [k for k in row if k not in self.columns]

    def log(self, row: dict) -> None:
        """Add a row (merging into the last row when it is the same step) and rewrite the file."""
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        if self.rows and str(self.rows[-1]["step"]) == str(row["step"]):
            self.rows[-1].update(row)
        else:
            self.rows.append(row)
        self._add_columns(row)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
