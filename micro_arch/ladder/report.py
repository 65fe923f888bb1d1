"""What a trained ladder says: a law per architecture with intervals, the better architecture at each
budget, where the laws cross, the loss at 10x the largest budget, and the ladder's own honesty check (the
law fitted without the largest budget, predicting it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from micro_arch.errors import MicroArchError
from micro_arch.ladder.fit import ALPHAS, LadderFit, PowerLaw, crossings, fit_with_bootstrap
from micro_arch.report.seed_stats import Arm, describe, difference

BOUNDS = {"E": 0.0, "alpha": 0.0}  # an interval stops at the bound the fit keeps its parameter above

EXTRAPOLATE = 10.0  # the report predicts the loss at this multiple of the largest budget


@dataclass
class Holdout:
    """The law fitted without the largest budget, against what that budget measured."""
    budget: float
    predicted: float
    low: float
    high: float
    measured: float
    note: str = ""

    @property
    def error(self) -> float:
        return self.predicted - self.measured


@dataclass
class ArchResult:
    arch: str
    fit: LadderFit | None
    holdout: Holdout | None
    notes: list[str] = field(default_factory=list)


def analyse(points, n_boot: int = 1000) -> tuple[dict[str, ArchResult], list[str], list[str]]:
    """(by architecture its fits, one verdict line per budget, crossing lines) from point_results' table."""
    results = {}
    for arch, rows in points.groupby("arch", sort=False):
        results[arch] = _analyse_arch(arch, rows, n_boot)
    return results, budget_verdicts(points), crossing_lines(results, points)


def _analyse_arch(arch: str, rows, n_boot: int) -> ArchResult:
    budgets = sorted(rows["budget"].unique())
    if len(budgets) < 3:
        return ArchResult(arch, None, None, [f"{arch}: {len(budgets)} budget(s) completed; a law needs 3"])
    try:
        fit = fit_with_bootstrap(rows["flops"].to_numpy(), rows["loss"].to_numpy(), n_boot=n_boot)
    except MicroArchError as err:
        return ArchResult(arch, None, None, [f"{arch}: {err}"])
    notes = []
    if fit.df == 0:
        notes.append(f"{arch}: one seed at each of 3 budgets fits the law exactly, so it has no intervals; "
                     "add seeds or budgets")
    if fit.law.E <= 0:
        notes.append(f"{arch}: E, the loss floor, is fitted at its bound 0: these budgets are far from any floor "
                     "(the curve looks like a pure power law), so E is not measured and extrapolations lean on α")
    if not ALPHAS[1] < fit.law.alpha < ALPHAS[-2]:
        notes.append(f"{arch}: α = {fit.law.alpha:.3g} is at the edge of the range searched; the fit is not "
                     "trustworthy")
    rest = rows[rows["budget"] < budgets[-1]]
    floor = len(budgets) - 1 >= 3
    try:
        early = fit_with_bootstrap(rest["flops"].to_numpy(), rest["loss"].to_numpy(), n_boot=n_boot, floor=floor)
    except MicroArchError as err:
        return ArchResult(arch, fit, None, [*notes, f"{arch}: no honesty check: without the largest budget, {err}"])
    top = rows[rows["budget"] == budgets[-1]]
    at = float(top["flops"].mean())
    mid, low, high = (float(v[0]) for v in (early.predict([at]) if early.boot else
                                             (early.law([at]), [math.nan], [math.nan])))
    note = "" if floor else ("with two smaller budgets, the law without the largest is fitted without a floor "
                             "(E = 0: L = A·C^(−α))")
    return ArchResult(arch, fit, Holdout(budgets[-1], mid, low, high, float(top["loss"].mean()), note), notes)


def budget_verdicts(points) -> list[str]:
    """At each budget: the architecture with the lowest mean loss, against each of the others."""
    lines = []
    for budget, rows in points.groupby("budget"):
        # points of one seed share their data order across architectures (train.seed orders the data, or one
        # train.data_seed orders it for all), so the arms pair by seed
        arms = [Arm(arch, dict(zip(map(int, r["seed"]), r["loss"])), {int(s): int(s) for s in r["seed"]})
                for arch, r in rows.groupby("arch", sort=False)]
        if len(arms) < 2:
            continue
        arms.sort(key=lambda a: a.mean)
        means = " < ".join(f"{a.label} {a.mean:.4f}" for a in arms)
        if min(a.n for a in arms) < 2:
            lines.append(f"at {budget:.3g} FLOPs: means {means}; no winner: one seed per point leaves training "
                         "noise unknown (give the ladder seeds: 3, or --seeds 3)")
            continue
        verdicts = [describe(difference(arms[0], other)) for other in arms[1:]]
        lines.append(f"at {budget:.3g} FLOPs: means {means}; " + "; ".join(verdicts))
    return lines


def crossing_lines(results: dict[str, ArchResult], points) -> list[str]:
    fitted = {a: r.fit.law for a, r in results.items() if r.fit is not None}
    names = list(fitted)
    low, high = float(points["flops"].min()), float(points["flops"].max())
    lines = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            found = crossings(fitted[a], fitted[b], low / 10, high * 100)
            if not found:
                lead = a if fitted[a](high) < fitted[b](high) else b
                lines.append(f"{a} and {b}: the fits do not cross between {low / 10:.3g} and {high * 100:.3g} "
                             f"FLOPs ({lead} lower throughout)")
            for c in found:
                where = "within the measured budgets" if low <= c <= high else "outside the measured budgets, so " \
                                                                              "an extrapolation"
                lines.append(f"{a} and {b}: the fits cross at {c:.3g} FLOPs ({where})")
    return lines


def fits_table(results: dict[str, ArchResult], largest: float):
    import pandas as pd

    rows = []
    for arch, r in results.items():
        if r.fit is None:
            rows.append({"architecture": arch})
            continue
        f, h = r.fit, r.holdout
        far = EXTRAPOLATE * largest
        mid, low, high = (float(v[0]) for v in (f.predict([far]) if f.boot else (f.law([far]), [math.nan], [math.nan])))
        row = {"architecture": arch, "α": _with_interval(f, "alpha"), "E": _with_interval(f, "E"),
               "A": f"{f.law.A:.3g}", f"loss at {far:.3g} FLOPs (10x)": _span(mid, low, high)}
        if h is not None:
            row |= {"largest budget, predicted without it": f"{h.budget:.3g}: {_span(h.predicted, h.low, h.high)}",
                    "measured": f"{h.measured:.4f}",
                    "prediction error": f"{h.error:+.4f} ({h.error / h.measured:+.1%})"}
        rows.append(row)
    return pd.DataFrame(rows)


def _with_interval(fit: LadderFit, name: str) -> str:
    low, high = fit.interval(name) if fit.boot else (math.nan, math.nan)
    return _span(getattr(fit.law, name), max(low, BOUNDS[name]), high)


def _span(mid, low, high) -> str:
    return f"{mid:.4f}" if not math.isfinite(low) else f"{mid:.4f} [{low:.4f}, {high:.4f}]"


def plot_ladder(points, results: dict[str, ArchResult], path: Path) -> None:
    """Log-log: every point (one dot per seed), each law and its 95% band, out to 10x the largest budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    low, high = float(points["flops"].min()), float(points["flops"].max())
    grid = np.geomspace(low / 1.5, high * EXTRAPOLATE, 200)
    for i, (arch, rows) in enumerate(points.groupby("arch", sort=False)):
        color = f"C{i % 10}"
        ax.plot(rows["flops"], rows["loss"], "o", color=color, markersize=4, alpha=0.8)
        r = results.get(arch)
        if r is None or r.fit is None:
            continue
        f: PowerLaw = r.fit.law
        label = f"{arch}: E={f.E:.3f}, α={f.alpha:.3f}"
        ax.plot(grid, f(grid), "-", color=color, label=label)
        if r.fit.boot:
            _, lo, hi = r.fit.predict(grid)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.axvspan(high, grid[-1], color="0.9", zorder=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.yaxis,):  # plain numbers on the log loss axis, not 4 x 10^0
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title("L(C) = E + A·C^(−α), 95% bands (shaded: extrapolated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, title: str, description: str, table, budget_lines, cross_lines, notes,
                   holdout_lines, points, command: str) -> None:
    from micro_arch.report.tables import markdown_table

    out = [f"# Ladder: {title}", "", description, "", f"Command: `{command}`", "",
           "![loss against compute](ladder.png)", "", "## Laws", "",
           "L(C) = E + A·C^(−α) per architecture: C is each point's training FLOPs (tokens seen x FLOPs per "
           "token), L its final held-out loss (the trainer's evaluation on train.eval_batches batches). "
           "Intervals are 95%, from a bootstrap over the points (residuals drawn again at every budget and seed, "
           "t-scaled for the few points); they assume the law's shape, which the honesty check tests.", "",
           markdown_table(table), "", "## Honesty check", "", *[f"- {line}" for line in holdout_lines], "",
           "## Better at each budget", "", *[f"- {line}" for line in budget_lines or ["one architecture only"]], "",
           "## Crossings", "", *[f"- {line}" for line in cross_lines or ["one law only"]], ""]
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    shown = points.drop(columns=["folder"]).copy()
    out += ["## Points", "", markdown_table(shown)]
    path.write_text("\n".join(out) + "\n")


def holdout_lines(results: dict[str, ArchResult]) -> list[str]:
    lines = []
    for arch, r in results.items():
        h = r.holdout
        if h is None:
            continue
        interval = f" [{h.low:.4f}, {h.high:.4f}]" if math.isfinite(h.low) else ""
        lines.append(f"{arch}: fitted without {h.budget:.3g} FLOPs, the law predicts {h.predicted:.4f}{interval}; "
                     f"measured {h.measured:.4f}; error {h.error:+.4f} nats ({h.error / h.measured:+.1%})"
                     + (f"; {h.note}" if h.note else ""))
    return lines
