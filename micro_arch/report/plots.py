"""Loss curves of several runs on shared axes, against tokens, wall time and training FLOPs."""

from __future__ import annotations

from pathlib import Path

# (file, column of the curves, axis label, caption)
AXES = [
    ("loss_vs_tokens.png", "tokens", "tokens seen", "against tokens seen"),
    ("loss_vs_time.png", "elapsed_s", "wall time (s)", "against wall time"),
    ("loss_vs_flops.png", "flops", "training FLOPs (tokens x FLOPs per token)", "against training FLOPs"),
]


def plot_curves(curves: dict, folder: Path, unit: str, groups: dict | None = None) -> list[tuple[str, str]]:
    """One PNG per x axis, held-out and training loss side by side, one line per run; [(file, caption)].

    curves: by run label, a DataFrame with columns tokens, elapsed_s, flops, train_loss, val_loss
    (missing values where a step logged only one of them), already in `unit`. groups: by arm label, its
    runs' labels; an arm of several seeds is drawn as its mean with a band from its lowest to highest seed.
    """
    groups = {g: [r for r in members if r in curves] for g, members in (groups or {}).items()}
    several = any(len(members) > 1 for members in groups.values())
    if not several:  # one line per run, under its own label
        groups = {label: [label] for label in curves}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    band_note = ": each seed group's mean, its band from the lowest to the highest seed" if several else ""
    written = []
    for name, x, xlabel, caption in AXES:
        fig, (held, train) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
        for i, (label, members) in enumerate(groups.items()):
            color = f"C{i % 10}"
            frames = [curves[m] for m in members]
            for ax, y, style in ((held, "val_loss", "o-"), (train, "train_loss", "-")):
                band = mean_band(frames, x, y)
                if band is None:
                    continue
                grid, mean, low, high = band
                seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
                ax.plot(grid, mean, style, color=color, markersize=3, linewidth=1.2, label=label + seeds)
                if len(members) > 1:
                    ax.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        _finish(fig, held, train, xlabel, unit, _interesting_range(curves), folder / name)
        written.append((name, f"Held-out and training loss ({unit}) {caption}{band_note}"))
    return written


def _finish(fig, held, train, xlabel: str, unit: str, y_range, path: Path) -> None:
    """Titles, labels, grid and the held-out panel's range; the figure saved and closed."""
    import matplotlib.pyplot as plt

    for ax, title in ((held, "held-out loss"), (train, "training loss")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    held.set_ylim(*y_range)
    held.set_ylabel(unit)
    held.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interesting_range(curves: dict) -> tuple[float, float]:
    """Loss limits that leave out the first tenth of training, whose steep drop would flatten the rest."""
    import numpy as np

    values = []
    for df in curves.values():
        values.append(df["val_loss"].dropna().to_numpy())
        values.append(df["train_loss"].iloc[len(df) // 10:].dropna().to_numpy())
    values = np.concatenate(values) if values else np.array([])
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.1
    return low - pad, high + pad


def mean_band(frames: list, x: str, y: str):
    """(grid, mean, low, high) of several curves on the x values any of them has, within the range they all
    cover (each interpolated linearly between its own points); None when they share no range."""
    import numpy as np

    parts = [df.dropna(subset=[x, y]).sort_values(x) for df in frames]
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    lo, hi = max(float(p[x].iloc[0]) for p in parts), min(float(p[x].iloc[-1]) for p in parts)
    grid = np.unique(np.concatenate([p[x].to_numpy(float) for p in parts]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if not len(grid):
        return None
    ys = np.stack([np.interp(grid, p[x].to_numpy(float), p[y].to_numpy(float)) for p in parts])
    return grid, ys.mean(0), ys.min(0), ys.max(0)
