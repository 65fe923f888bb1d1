"""Markdown tables for the reports that sweeps and comparisons write."""

from __future__ import annotations

import math


def markdown_table(df) -> str:
    """A pandas DataFrame as a GitHub markdown table (without needing `tabulate`)."""
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
