"""What a sweep leaves beside its study: trials.csv and trials.md (with the worker and host that ran each
trial and how long it waited for it), parameter importances, plots."""

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
    hidden = ("user_attrs_runs_root", "user_attrs_memory_method", "user_attrs_pid", "user_attrs_host",
              "user_attrs_queued_at")
    shown = df.drop(columns=[c for c in df.columns if c in hidden])
    if "user_attrs_skipped" in shown:  # trials that stepped aside at once (surplus, duplicate): nothing to see
        shown = shown[shown["user_attrs_skipped"].isna()].drop(columns=["user_attrs_skipped"])
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
    elif best is None and sweep.top_k:
        lines += ["## Trained in full", "", f"Skipped: no trial completed, so there is no best configuration to "
                  f"train in full (top_k={sweep.top_k}).", ""]
    lines += ["## Workers", "", markdown_table(workers_table(study)), ""]
    lines += ["## Trials", "", markdown_table(shown)]
    lines += [f"![{name}]({name})" for name in images]
    (folder / "trials.md").write_text("\n".join(lines) + "\n")
    if console is not None:
        _print_summary(console, study, sweep, folder)


def workers_table(study: optuna.Study):
    """Per worker (host/name): its host, the trials it ran, and how long it waited for them in all (the time
    from being free to starting a trial: the study's latency, or an empty queue)."""
    import pandas as pd

    from micro_arch.sweep.budget import Ledger

    ledger = Ledger(study.trials)
    rows: dict[str, dict] = {}
    for t in study.trials:
        name = t.user_attrs.get("worker")
        if name is None or t.user_attrs.get("skipped"):
            continue
        row = rows.setdefault(name, {"worker": name, "host": t.user_attrs.get("host"), "trials": 0,
                                     "counted": 0, "waited_s": 0.0})
        row["trials"] += 1
        row["counted"] += ledger.counted(t)
        row["waited_s"] = round(row["waited_s"] + t.user_attrs.get("wait_s", 0.0), 2)
    return pd.DataFrame(list(rows.values()) or [{"worker": "-", "host": "-", "trials": 0, "counted": 0,
                                                  "waited_s": 0.0}])


def _print_summary(console, study, sweep, folder: Path) -> None:
    from rich.table import Table

    table = Table(title=f"sweep {sweep.name}: {sweep.objective}")
    keys = list(sweep.search_space)
    for col in ["trial", "state", sweep.objective, "memory MiB", "worker", "waited s", *keys]:
        table.add_column(col)
    from micro_arch.sweep.budget import Ledger

    ledger = Ledger(study.trials)
    shown = [t for t in study.trials if not t.user_attrs.get("skipped")]
    for t in sorted(shown, key=lambda t: (t.value is None, t.value or 0.0)):
        mem = t.user_attrs.get("memory_estimate_mb")
        state = t.state.name.lower() + (f" ({ledger.note(t)})" if ledger.note(t) else "")
        table.add_row(str(t.number), state, "" if t.value is None else f"{t.value:.4f}",
                      "" if mem is None else f"{mem:,.1f}", t.user_attrs.get("worker", ""),
                      f"{t.user_attrs.get('wait_s', 0.0):.1f}", *[str(t.params.get(k, "")) for k in keys])
    console.print(table)
    console.print(f"report: {folder / 'trials.md'}")
