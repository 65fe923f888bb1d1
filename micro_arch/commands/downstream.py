"""`micro-arch eval RUN_DIR... --tasks T1,T2`: lm-evaluation-harness tasks on one or more runs, one table."""

from __future__ import annotations

from pathlib import Path


def downstream_command(run_dirs: list, tasks: str | list[str], num_fewshot: int | None = None,
                       limit: int | None = None, batch_size: int = 16, include_path: str | None = None,
                       checkpoint=None, device: str = "auto", apply_chat_template: bool = False,
                       console=None) -> list[dict]:
    """Evaluate every run (each into its downstream.json), then print one table; returns the evaluations."""
    from rich.console import Console
    from rich.markup import escape

    from micro_arch.eval.downstream import (
        check_request,
        evaluate_tasks,
        require_lm_eval,
        setting_text,
        task_manager,
    )

    console = console or Console()
    seen, unique = set(), []
    for run_dir in run_dirs:  # a run given twice is evaluated once
        if Path(run_dir).resolve() not in seen:
            seen.add(Path(run_dir).resolve())
            unique.append(run_dir)
    run_dirs = unique
    names = [n.strip() for n in (tasks.split(",") if isinstance(tasks, str) else tasks) if n.strip()]
    for run_dir in run_dirs:  # every run's problem before any task is loaded
        check_request(run_dir, names, num_fewshot, limit, checkpoint)
    require_lm_eval()
    manager = task_manager(names, include_path)
    evaluations = []
    for run_dir in run_dirs:
        console.print(f"[dim]{escape(str(run_dir))}: {escape(', '.join(n.strip() for n in names))}[/]")
        evaluations.append(evaluate_tasks(run_dir, names, num_fewshot=num_fewshot, limit=limit,
                                          batch_size=batch_size, include_path=include_path, checkpoint=checkpoint,
                                          device=device, apply_chat_template=apply_chat_template,
                                          manager=manager))
    console.print(scores_table(run_dirs, evaluations, f"downstream tasks ({setting_text(evaluations[0])})"))
    console.print("centered = (accuracy - chance) / (1 - chance); CORE = its mean over the tasks, ± lm-eval's "
                  "standard errors; written to each run's downstream.json")
    return evaluations


def _cell(value, stderr, fmt="{:.3f}") -> str:
    if value is None:
        return "—"
    return fmt.format(value) + ("" if stderr is None else f"±{stderr:.3f}")


def scores_table(run_dirs: list, evaluations: list[dict], title: str):
    """Tasks as rows, one column per run: accuracy ± its error, then the centered accuracy ± its error."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task", no_wrap=True)
    table.add_column("chance", justify="right", no_wrap=True)
    unique = len({Path(x).name for x in run_dirs}) == len(run_dirs)
    for run_dir in run_dirs:
        table.add_column(f"{Path(run_dir).name if unique else run_dir}\naccuracy | centered", justify="right")
    for task in sorted(evaluations[0]["scores"]):
        first = evaluations[0]["scores"][task]
        row = [task, "—" if first["chance"] is None else f"{first['chance']:.3f}"]
        for ev in evaluations:
            s = ev["scores"][task]
            if s["accuracy"] is None and "bits_per_byte" in s.get("metrics", {}):  # a perplexity task
                row.append(f"{s['metrics']['bits_per_byte']:.4f} bits/byte")
                continue
            row.append(f"{_cell(s['accuracy'], s['stderr'])} | {_cell(s['centered'], s['centered_stderr'], '{:+.3f}')}")
        table.add_row(*row)
    table.add_row("CORE (mean centered)", "", *(_cell(ev["core"]["centered"], ev["core"]["stderr"], "{:+.3f}")
                                                for ev in evaluations), style="bold")
    return table
