"""What a sweep leaves beside its study: trials.csv and trials.md, parameter importances, plots."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from micro_arch.report.tables import markdown_table


def importances(study: optuna.Study) -> dict[str, float] | str:
    """Parameter importances (fANOVA), or why there are none yet."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return f"not enough completed trials ({len(complete)}) to estimate parameter importances"
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError) as err:
        return f"parameter importances unavailable: {err}"


def plots(study: optuna.Study, folder: Path) -> list[str]:
    """history.png always; slice.png and parallel_coordinate.png once two trials have completed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    makers = [("history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2:
        makers += [("slice.png", ovm.plot_slice), ("parallel_coordinate.png", ovm.plot_parallel_coordinate)]
    for name, make in makers:
        try:
            ax = make(study)
        except (ValueError, RuntimeError):
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(max(6.4, fig.get_size_inches()[0]), 4.8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write_report(study: optuna.Study, folder: Path, sweep, finals: list[dict], console=None) -> None:
    import warnings

    folder.mkdir(parents=True, exist_ok=True)
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    df.to_csv(folder / "trials.csv", index=False)
    shown = df.drop(columns=[c for c in df.columns if c in ("user_attrs_runs_root", "user_attrs_memory_method")])
    imp = importances(study)
    with warnings.catch_warnings():  # optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore")
        images = plots(study, folder)
    (folder / "importances.json").write_text(json.dumps(imp, indent=2) + "\n")
    best = None
    try:
        best = study.best_trial
    except ValueError:
        pass
    lines = [f"# Sweep {sweep.name}", "", f"Experiment `{sweep.experiment}`, objective {sweep.objective} "
             f"(lower is better), sampler {sweep.sampler}, pruner {sweep.pruner}, {len(study.trials)} trials.", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {sweep.objective} {best.value:.4f}, "
                  + ", ".join(f"`{k}={v}`" for k, v in best.params.items()), ""]
    lines += ["## Parameter importances", ""]
    lines += ([f"- `{k}`: {v:.3f}" for k, v in imp.items()] if isinstance(imp, dict) else [imp]) + [""]
    if finals:
        lines += ["## Trained in full", ""] + [f"- trial {f['trial']} -> `{f['run_dir']}`" for f in finals] + [""]
    lines += ["## Trials", "", markdown_table(shown)]
    lines += [f"![{name}]({name})" for name in images]
    (folder / "trials.md").write_text("\n".join(lines) + "\n")
    if console is not None:
        _print_summary(console, study, sweep, folder)


def _print_summary(console, study, sweep, folder: Path) -> None:
    from rich.table import Table

    table = Table(title=f"sweep {sweep.name}: {sweep.objective}")
    keys = list(sweep.search_space)
    for col in ["trial", "state", sweep.objective, "memory MiB", *keys]:
        table.add_column(col)
    for t in sorted(study.trials, key=lambda t: (t.value is None, t.value or 0.0)):
        mem = t.user_attrs.get("memory_estimate_mb")
        table.add_row(str(t.number), t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}",
                      "" if mem is None else f"{mem:,.1f}", *[str(t.params.get(k, "")) for k in keys])
    console.print(table)
    console.print(f"report: {folder / 'trials.md'}")
