"""`micro-arch compare`: evaluate runs on their held-out split and write a report that compares them fairly.

The report folder gets report.md, report.html, report.csv (the raw numbers, one row per run) and the
loss curves as PNG; the terminal gets the same table and verdicts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from micro_arch.errors import MicroArchError
from micro_arch.report.fairness import NOISE_SIGMAS, Fairness, assess, standard_error, verdicts
from micro_arch.report.groups import arm_verdicts, arms, arms_table, expand_groups, group_runs
from micro_arch.report.point import Point, comparison_point
from micro_arch.report.runs import Run, collect_run, lineage
from micro_arch.report.write import Report, write_report

SAMPLE_SETTINGS = "200 new tokens, temperature 0.8, top-k 200, seed 0"  # sample_from_run's defaults


def _count(v):
    return f"{int(v):,}"


# (row label, column of the runs table, format); "_se" columns add their ± to the value
ROWS = [
    ("experiment", "experiment", str),
    ("run", "run_id", str),
    ("blocks", "blocks", str),
    ("started from", "parent", str),
    ("settings that differ", "differs", str),
    ("tokenizer", "tokenizer", str),
    ("parameters", "params_total", _count),
    ("non-embedding parameters", "params_non_embedding", _count),
    ("FLOPs per token", "flops_per_token", "{:.3g}".format),
    ("tokens seen", "tokens_seen", _count),
    ("training FLOPs", "train_flops", "{:.3g}".format),
    ("wall time", "wall_time_s", "{:,.1f} s".format),
    ("best held-out loss (training)", "best_val_loss", "{:.4f}".format),
    ("final held-out loss (training)", "final_val_loss", "{:.4f}".format),
    ("held-out loss (full split)", "eval_loss", "{:.4f}".format),
    ("compared at", "compared_at", str),
    ("held-out value compared", "at_value", "{:.4f}".format),
    ("perplexity", "perplexity", "{:.3f}".format),
    ("bits per byte", "bits_per_byte", "{:.4f}".format),
    ("top-1 accuracy", "top1", "{:.2%}".format),
    ("top-5 accuracy", "top5", "{:.2%}".format),
    ("throughput", "tokens_per_sec", "{:,.0f} tok/s".format),
    ("peak memory", "peak_memory_mb", "{:,.1f} MiB".format),
]
FORMAT = {key: fmt for _, key, fmt in ROWS}
PER_TOKEN = {"best_val_loss", "final_val_loss", "eval_loss", "perplexity", "top1", "top5"}
HELD_OUT = PER_TOKEN | {"bits_per_byte"}
WITH_ERROR = {"eval_loss", "perplexity", "bits_per_byte"}


def compare(run_dirs, out=None, prompts: list[str] | None = None, console=None, batch_size: int = 32,
            max_batches: int | None = None, device: str = "auto", at: str = "flops") -> Path:
    """Write the report on run_dirs into `out` (default runs/compare/<time>), print it, return the folder.

    A seed group's folder stands for its members. Runs that differ only in seed are one arm; arms are
    compared at `at` (report.point: flops, tokens, time or end). Runs that cannot be compared get a line in
    the report instead; MicroArchError only when none can.
    """
    run_dirs = expand_groups(run_dirs)
    from rich.console import Console

    console = console or Console()
    folder = Path(out) if out else Path("runs") / "compare" / time.strftime("%Y%m%d-%H%M%S")
    if out is not None and not folder.is_dir() and not folder.parent.is_dir():
        raise MicroArchError(f"--out {folder}: the folder {folder.parent} does not exist; create it first or "
                             "pick a report folder in an existing one")
    runs, left_out = collect_runs(run_dirs, console, batch_size=batch_size, max_batches=max_batches,
                                  device=device, prompts=prompts)
    if not runs:  # nothing to report: say why, and write no report
        from rich.markup import escape

        for line in left_out:
            console.print(f"[red]left out[/]: {escape(line)}")
        raise MicroArchError(f"none of the {len(run_dirs)} run directories could be compared (the lines "
                             "above say why); pass completed run directories, such as "
                             "runs/<experiment>/<run-id>")
    existed = folder.is_dir()
    try:  # only the report folder itself when --out names one; runs/compare/ as needed by default
        folder.mkdir(parents=out is None, exist_ok=True)
    except OSError as err:
        raise MicroArchError(f"--out {folder}: cannot create the report folder ({err.strerror}); "
                             "pass a folder path that can be written") from None
    try:
        report = _write(runs, left_out, prompts, max_batches, folder, at)
    except BaseException:
        if not existed:  # no half-written or empty report folder is left behind
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        raise
    print_report(console, report, folder)
    return folder


def _write(runs: list[Run], left_out: list[str], prompts, max_batches, folder: Path, at: str = "flops") -> Report:
    """The report's files in `folder`: report.md, report.html, report.csv and the plots."""
    label_runs(runs)
    table = runs_table(runs)
    fairness = assess({r.label: {**r.summary, "corpus_key": r.corpus_key} for r in runs})
    curves, unit = loss_curves(runs, table, fairness)
    point = comparison_point(at, {r.label: curves.get(r.label) for r in runs},
                             table[fairness.headline].map(lambda v: None if _missing(v) else float(v)).to_dict(),
                             fairness)
    table["compared_at"] = [_at_text(point) for _ in runs]
    table["at_value"] = [point.values.get(r.label) for r in runs]
    groups = group_runs(runs)
    report = build_report(runs, table, fairness, left_out, prompts, max_batches, point=point, groups=groups)
    from micro_arch.report.downstream import add_downstream

    add_downstream(report, runs)  # downstream.json scores, compared within one setting (tasks, shots, limit)
    if curves:
        from micro_arch.report.plots import plot_curves

        report.images = plot_curves(curves, folder, unit, groups={g: [r.label for r in members]
                                                                  for g, members in groups.items()})
    table.to_csv(folder / "report.csv", index_label="run")
    write_report(report, folder)
    return report


def collect_runs(paths, console, **options) -> tuple[list[Run], list[str]]:
    """(the runs that can be compared, one line for each that cannot), with a progress line meanwhile."""
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    runs, left_out, seen = [], [], set()
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("reading runs", total=len(paths))
        for given in paths:
            path = Path(given)
            if path.resolve() in seen:
                left_out.append(f"{path}: given twice; compared once")
            else:
                seen.add(path.resolve())
                try:
                    def status(text):
                        progress.update(task, description=escape(text))

                    run = collect_run(path, status=status, **options)
                    runs.append(run)
                    progress.console.print(f"[dim]{escape(str(path))}: "
                                           f"{'eval.json reused' if run.reused_eval else 'evaluated'}[/]")
                except MicroArchError as err:
                    left_out.append(str(err))
                except OSError as err:
                    left_out.append(f"{path}: {err}; compare reads the run directory and keeps "
                                    "eval.json in it, so it needs to read and write there (copy the run "
                                    "somewhere writable)")
            progress.advance(task)
    return runs, left_out


def label_runs(runs: list[Run]) -> None:
    """Name each run by its experiment, adding the run folder where an experiment appears twice."""
    names = [r.summary.get("experiment") or r.path.name for r in runs]
    for run, name in zip(runs, names):
        folder = (f"{run.path.parent.name}/{run.path.name}" if (run.path.parent / "group.json").is_file()
                  else run.path.name)  # a seed group's member: seed-N in its group's folder
        run.label = name if names.count(name) == 1 else f"{name}/{folder}"
    labels = [r.label for r in runs]
    for i, run in enumerate(runs):
        if labels.count(run.label) > 1:
            run.label = f"{run.label} #{i + 1}"


def blocks_text(layers) -> str:
    def spec(s):
        return " || ".join(s) if isinstance(s, list) else str(s)

    return "; ".join(f"{spec(g.get('spec'))} x{g.get('repeat', 1)}" for g in layers or [])


IGNORED_SETTINGS = ("name", "description", "extends")


def differing_settings(runs: list[Run]) -> dict[str, str]:
    """By run, its values of the config keys whose values are not the same in every run."""
    keys = sorted({k for r in runs for k in r.settings if k not in IGNORED_SETTINGS})
    differ = [k for k in keys if len({repr(r.settings.get(k)) for r in runs}) > 1]
    return {r.label: "\n".join(f"{k}={r.settings.get(k)}" for k in differ) for r in runs}


def runs_table(runs: list[Run]):
    """One row per run (indexed by label) of raw numbers: summary.json, eval.json and their noise."""
    import pandas as pd

    rows = {}
    differs = differing_settings(runs)
    for r in runs:
        s, h = r.summary, r.held_out
        loss, bpb, ppl, n = h.get("val_loss"), h.get("bits_per_byte"), h.get("perplexity"), h.get("n_tokens")
        se = standard_error(h.get("batch_losses") or [])
        flops, tokens = s.get("flops_per_token"), s.get("tokens_seen")
        rows[r.label] = {
            "path": str(r.path), "experiment": s.get("experiment"), "run_id": r.path.name,
            "blocks": blocks_text(s.get("layers")), "parent": lineage(r.path), "differs": differs[r.label],
            "tokenizer": s.get("tokenizer"),
            "data_fingerprint": s.get("data_fingerprint"),
            "params_total": s.get("params_total"), "params_non_embedding": s.get("params_non_embedding"),
            "flops_per_token": flops, "tokens_seen": tokens,
            "train_flops": flops * tokens if flops is not None and tokens is not None else None,
            "wall_time_s": s.get("wall_time_s"),
            "best_val_loss": s.get("best_val_loss"), "final_val_loss": s.get("final_val_loss"),
            "eval_loss": loss, "eval_loss_se": se,
            "perplexity": ppl, "perplexity_se": ppl * se if ppl is not None and se is not None else None,
            "bits_per_byte": bpb,
            "bits_per_byte_se": bpb / loss * se if bpb is not None and loss and se is not None else None,
            "top1": h.get("top1"), "top1_se": _binomial_se(h.get("top1"), n),
            "top5": h.get("top5"), "top5_se": _binomial_se(h.get("top5"), n),
            "tokens_per_sec": s.get("tokens_per_sec"), "peak_memory_mb": s.get("peak_memory_mb"),
            "eval_tokens": n, "eval_batches": len(h.get("batch_losses") or []),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def _binomial_se(p, n):
    # neighbouring tokens are correlated, so this understates the noise of an accuracy
    return math.sqrt(p * (1 - p) / n) if p is not None and n else None


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def formatted_table(table, fairness: Fairness):
    """Metrics as rows, runs as columns, values as text; marks on rows that are not comparable."""
    import pandas as pd

    marks, footnotes = {}, []
    if not fairness.same_held_out:
        marks.update(dict.fromkeys(HELD_OUT, " ‡"))
    elif not fairness.one_tokenizer:
        marks.update(dict.fromkeys(PER_TOKEN, " †"))
        footnotes.append("† per token: not comparable across tokenizers "
                         f"({', '.join(sorted(set(map(str, table['tokenizer']))))}); compare bits per byte.")
    if not fairness.same_held_out:
        footnotes.append("‡ not comparable: the runs were evaluated on different held-out data.")
    rows = []
    for label, key, fmt in ROWS:
        cells = {"metric": label + marks.get(key, "")}
        for run, values in table.iterrows():
            v = values.get(key)
            text = "n/a" if _missing(v) else fmt(v)
            se = values.get(key + "_se") if key in WITH_ERROR else None
            cells[run] = text if _missing(se) else f"{text} ± {fmt(se)}"
        rows.append(cells)
    return pd.DataFrame(rows, columns=["metric", *table.index]), footnotes


def _metric(key: str):
    from micro_arch.report.fairness import RANKED

    return next(m for m in RANKED if m.key == key)


def _at_text(point: Point) -> str:
    if point.at == "end":
        return "end (full split)"
    return {"flops": f"{point.x:.3g} FLOPs", "tokens": f"{point.x:,.0f} tokens",
            "time": f"{point.x:,.1f} s"}[point.at] if point.x is not None else "n/a"


def build_report(runs: list[Run], table, fairness: Fairness, left_out: list[str], prompts,
                 max_batches: int | None = None, point: Point | None = None, groups: dict | None = None) -> Report:
    found = verdicts(table, fairness, FORMAT) if len(runs) > 1 else []
    headline = next((v for v in found if v.key == fairness.headline), None)
    best, arms_shown = [], None
    if headline is not None:
        why = ("the runs use different tokenizers" if not fairness.one_tokenizer else
               f"all runs use the {table['tokenizer'].iloc[0]} tokenizer")
        if point is not None and groups is not None and fairness.comparable(_metric(fairness.headline)) is None:
            found_arms = arms(groups, point.values)
            arms_shown = arms_table(found_arms)
            lines = arm_verdicts(found_arms, "", "nats" if fairness.one_tokenizer else "bits per byte")
            if lines:
                outcome = "; ".join(lines)
            elif len(groups) < 2:
                outcome = ("the runs differ only in seed, so they are one arm (see Seed groups); there is no "
                           "other arm to compare with")
            else:
                outcome = ("fewer than two arms have a value there (the notes say why); nothing is ranked; "
                           "compare at the end of training (--at end), or evaluate more often (train.eval_every)")
            best.append(f"Overall, on {headline.metric} ({why}), {point.words}: {outcome}.")
        else:
            best.append(f"Overall, on {headline.metric} ({why}): {headline.text.split(': ', 1)[1]}.")
    # held-out numbers are ranked across seeds above (training noise), never run against run on the noise
    # of evaluation batches alone; what cannot be compared still says so
    best += [v.text for v in found if v.key not in HELD_OUT or v.best is None and not v.tied]
    shown, footnotes = formatted_table(table, fairness)
    row_of = {key: i for i, (_, key, _) in enumerate(ROWS)}
    bold = {(row_of[v.key], v.best) for v in found if v.best and v.key in row_of and v.key not in HELD_OUT}
    n_left = len(left_out)
    split = ("whole held-out split" if max_batches is None else
             f"held-out split (its first {max_batches} batches)")
    intro = [f"{len(runs)} run(s) compared" + (f", {n_left} left out (see below)." if n_left else "."),
             f"Held-out numbers cover each run's {split} (eval.json); best and final held-out loss "
             "(training) are the trainer's estimates on train.eval_batches batches. Runs that differ only in "
             "seed are one arm; on held-out numbers an arm is named better only when the 95% interval of its "
             "difference across seeds excludes zero (Welch's t on the seed means, or paired by seed when the "
             "arms share data orders), never from one seed per arm. Throughput and memory are ranked when a "
             f"lead exceeds {NOISE_SIGMAS:g} standard errors of the difference."]
    if len(runs) < 2:
        intro.append("Fewer than two runs could be compared, so nothing is ranked.")
    notes = fairness.notes + [note for r in runs for note in r.notes]
    samples: dict[str, dict[str, str]] = {}
    for r in runs:
        for s in r.samples:
            samples.setdefault(s.get("prompt", ""), {})[r.label] = s.get("text", "")
    note = (f"Fresh samples for the same prompts from every run ({SAMPLE_SETTINGS})." if prompts else
            "From each run's samples.json, written at the end of its training with its own train.sample "
            "settings.")
    if point is not None:
        notes += point.notes
    return Report(f"Comparing {len(runs)} runs", intro, left_out, notes, best, shown, bold, footnotes,
                  samples=samples, samples_note=note, arms=arms_shown)


def loss_curves(runs: list[Run], table, fairness: Fairness):
    """Curves for the plots: per token in nats, or in bits per byte once tokenizers differ."""
    curves = {}
    for r in runs:
        if r.curves is None:
            continue
        df = r.curves.reindex(columns=["tokens", "elapsed_s", "train_loss", "val_loss"]).astype(float)
        df["flops"] = df["tokens"] * float(r.summary.get("flops_per_token") or math.nan)
        if not fairness.one_tokenizer:
            # each run's own tokens per byte, measured on its held-out split
            scale = table.at[r.label, "bits_per_byte"] / table.at[r.label, "eval_loss"]
            df[["train_loss", "val_loss"]] *= scale
        curves[r.label] = df
    unit = "nats per token" if fairness.one_tokenizer else "bits per byte (tokenizers differ)"
    return curves, unit


def print_report(console, report: Report, folder: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=report.title, show_lines=False)
    for col in report.table.columns:
        table.add_column(str(col), justify="left" if col == "metric" else "right", overflow="fold")
    for i, row in enumerate(report.table.itertuples(index=False)):
        cols = list(report.table.columns)
        cells = [escape(str(v)) if (i, c) not in report.bold else f"[bold green]{escape(str(v))}[/]"
                 for c, v in zip(cols, row)]
        table.add_row(*cells)
    if len(report.table.columns) > 1:
        console.print(table)
    if report.arms is not None and len(report.arms):
        arms_shown = Table(title="Seed groups")
        for col in report.arms.columns:
            arms_shown.add_column(str(col), overflow="fold")
        for row in report.arms.itertuples(index=False):
            arms_shown.add_row(*(escape(str(v)) for v in row))
        console.print(arms_shown)
    for note in report.footnotes:
        console.print(f"[dim]{escape(note)}[/]")
    for line in report.left_out:
        console.print(f"[red]left out[/]: {escape(line)}")
    for line in report.notes:
        console.print(f"[yellow]note[/]: {escape(line)}")
    for line in report.best:
        console.print(escape(line))
    console.print(f"report: {folder / 'report.md'} (and report.html, report.csv, "
                  f"{len(report.images)} plots)")
