"""`micro-arch ladder ladders/<name>.yaml`: train every (architecture, budget, seed) point, resumably, then fit
loss against compute per architecture and write the report (runs/ladders/<name>/ladder.md, ladder.png,
points.csv, fits.json)."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.console import Console

from micro_arch.rundir import write_json

console = Console()


def ladder_command(path, overrides=None, budgets=None, seeds=None, runs_root="runs", report_only: bool = False,
                   n_boot: int = 1000) -> Path:
    """Train the ladder's points (unless report_only), analyse them and write the report; returns its folder.
    `overrides` apply to every point after the file's own; `budgets` and `seeds` replace the file's."""
    from micro_arch.ladder.report import (
        analyse,
        fits_table,
        holdout_lines,
        plot_ladder,
        write_markdown,
    )
    from micro_arch.ladder.spec import load_ladder
    from micro_arch.ladder.train import check_plan, ladder_folder, plan_points, point_results, train_points
    from micro_arch.report.seed_stats import need_scipy

    need_scipy("micro-arch ladder")
    ladder = load_ladder(path, budgets=budgets, seeds=seeds)
    overrides = list(overrides or [])
    root = ladder_folder(ladder, runs_root)
    points = plan_points(ladder, runs_root)
    for p in points:
        p.overrides += overrides
    if not report_only:
        check_plan(points, root)
        train_points(points, runs_root)
    table = point_results(points)
    missing = len(points) - len(table)
    notes = [f"{missing} of {len(points)} points are not completed; the fits use the rest"] if missing else []
    if table.empty:
        console.print(f"no completed points in {root}; train them with micro-arch ladder {path}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    results, budget_lines, cross_lines = analyse(table, n_boot=n_boot)
    notes += [n for r in results.values() for n in r.notes]
    fits = fits_table(results, float(table["budget"].max()))
    checks = holdout_lines(results)
    table.to_csv(root / "points.csv", index=False)
    write_json(root / "fits.json", {a: None if r.fit is None else {
        "E": r.fit.law.E, "A": r.fit.law.A, "alpha": r.fit.law.alpha,
        **{f"{name}_interval": _clipped(r.fit.interval(name)) if r.fit.boot else None for name in ("E", "alpha")},
        "holdout": None if r.holdout is None else {"budget": r.holdout.budget, "predicted": r.holdout.predicted,
                                                   "measured": r.holdout.measured, "error": r.holdout.error},
    } for a, r in results.items()})
    plot_ladder(table, results, root / "ladder.png")
    command = shlex.join(["micro-arch", "ladder", str(path), *(["--set", *overrides] if overrides else []),
                          *(["--budgets", ",".join(f"{b:g}" for b in budgets)] if budgets else []),
                          *(["--seeds", str(seeds)] if seeds is not None else [])])
    write_markdown(root / "ladder.md", ladder.name, ladder.description, fits, budget_lines, cross_lines, notes,
                   checks, table, command)
    _print(fits, checks, budget_lines, cross_lines, notes, root)
    return root


def _clipped(interval) -> list[float]:
    """E and α are fitted at or above 0; so are their intervals."""
    return [max(interval[0], 0.0), interval[1]]


def _print(fits, checks, budget_lines, cross_lines, notes, root: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    shown = Table(title="L(C) = E + A·C^(−α), 95% intervals")
    for col in fits.columns:
        shown.add_column(str(col), overflow="fold")
    for row in fits.itertuples(index=False):
        shown.add_row(*(escape(str(v)) for v in row))
    console.print(shown)
    for title, lines in (("honesty check", checks), ("better at each budget", budget_lines),
                         ("crossings", cross_lines), ("note", notes)):
        for line in lines:
            console.print(f"[bold]{title}[/]: {escape(line)}", soft_wrap=True)
    console.print(f"report: {root / 'ladder.md'} (and ladder.png, points.csv, fits.json)")
