"""`micro-arch blocks [PATTERN]`: the registry as a table: name, kind, arguments and defaults, where defined."""

from __future__ import annotations

from rich.console import Console

from micro_arch.errors import MicroArchError

console = Console()


def blocks_command(pattern: str = "*", kind: str | None = None, experiment: str | None = None) -> None:
    from rich.table import Table

    from micro_arch.model.registry import DIM_NAMES, list_blocks

    if experiment:
        from micro_arch.config import experiment_path
        from micro_arch.experiment import load_blocks_of

        load_blocks_of(experiment_path(experiment))
    table = Table(title="micro-arch blocks", show_lines=False)
    for col in ("name", "kind", "arguments (defaults)", "defined in"):
        table.add_column(col, overflow="fold")
    for entry in list_blocks(pattern, kind):
        own = [(f"{n}={p.default!r}" if p.default is not p.empty else n)
               + (f" ({bounds})" if (bounds := entry.bounds_of(n)) else "")
               for n, p in entry.arguments.items() if n not in DIM_NAMES]
        shared = [n for n in entry.arguments if n in DIM_NAMES]
        text = ", ".join(own) + (f"  [dim](from model: {', '.join(shared)})[/]" if shared else "")
        table.add_row(f"[bold]{entry.name}[/]\n[dim]{entry.description}[/]", entry.kind, text,
                      _short_path(entry.source))
    if not table.rows:
        raise MicroArchError(f"no block matches {pattern!r}" + (f" of kind {kind}" if kind else ""))
    console.print(table)


def _short_path(path: str) -> str:
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path
