"""`micro-arch eval RUN_DIR`: held-out loss, perplexity, bits per byte and top-k accuracy, as a table and eval.json.

For an SFT/DPO run its stage's own measurement; with `data`, any text; for a context-extension run also the loss at
its parent's length.
"""

from __future__ import annotations

from pathlib import Path

from micro_arch.eval.evaluate import evaluate_run


def note_unfinished(console, run_dir: Path, doing: str = "evaluating", checkpoint=None) -> None:
    """An interrupted, running, crashed or diverged run is used at its latest checkpoint; say which it is."""
    from rich.markup import escape

    from micro_arch.report.runs import unfinished_state

    state = unfinished_state(run_dir)
    if state:
        which = f"checkpoint {checkpoint}" if checkpoint else "its latest checkpoint"
        console.print(f"[yellow]note[/]: {escape(state)}; {doing} {escape(which)}")


def eval_command(run_dir, data: str | None = None, checkpoint=None, batch_size: int = 32,
                 max_batches: int | None = None, device: str = "auto", text_field: str = "text",
                 tasks: str | None = None, num_fewshot: int | None = None, limit: int | None = None,
                 include_path: str | None = None, apply_chat_template: bool = False) -> None:
    """`micro-arch eval RUN_DIR`: evaluate, write eval.json, print a table. RUN_DIR may be a list of runs with
    `tasks` (lm-evaluation-harness tasks, one table for all runs)."""
    import json

    from rich.console import Console

    from micro_arch.errors import MicroArchError

    console = Console()
    run_dirs = [Path(r) for r in (run_dir if isinstance(run_dir, (list, tuple)) else [run_dir])]
    if tasks is not None:
        if data:
            raise MicroArchError("--tasks and --data are two different evaluations; pass one of them")
        from micro_arch.commands.downstream import downstream_command

        for r in run_dirs:
            note_unfinished(console, r, checkpoint=checkpoint)
        downstream_command(run_dirs, tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                           include_path=include_path, checkpoint=checkpoint, device=device,
                           apply_chat_template=apply_chat_template, console=console)
        return
    others = {"--num-fewshot": num_fewshot, "--limit": limit, "--include-path": include_path,
              "--apply-chat-template": apply_chat_template or None}
    given = [k for k, v in others.items() if v is not None]
    if given:
        raise MicroArchError(f"{given[0]} goes with --tasks (lm-evaluation-harness tasks); add --tasks T1,T2")
    if len(run_dirs) > 1:
        raise MicroArchError(f"{len(run_dirs)} run directories: the held-out evaluation takes one (with --tasks, "
                             "several give one table; `micro-arch compare` compares runs)")
    run_dir = run_dirs[0]
    note_unfinished(console, run_dir, checkpoint=checkpoint)
    if data:
        from micro_arch.eval.text import evaluate_on_data, unencodable_line

        result = evaluate_on_data(run_dir, data, checkpoint, batch_size, max_batches,
                                  device, text_field)
        console.print(_metrics_table(result, f"evaluation on {data}: {run_dir}"))
        console.print(unencodable_line(result))
        return
    from micro_arch.rundir import read_run_config
    from micro_arch.stages import stage_of

    if stage_of(read_run_config(run_dir)).is_chat:  # measured on its held-out conversations or pairs
        from micro_arch.stages.evaluate_stage import evaluate_stage_run, print_stage_eval

        print_stage_eval(console, run_dir, evaluate_stage_run(run_dir, checkpoint, batch_size, device,
                                                              max_batches))
        return
    result = evaluate_run(run_dir, checkpoint, batch_size, max_batches, device)
    summary = run_dir / "summary.json"
    trained_on = json.loads(summary.read_text()).get("data_fingerprint") if summary.is_file() else None
    if trained_on and trained_on != result["data_fingerprint"]:
        console.print("[yellow]warning: the held-out data differs from the data this run was trained "
                      "with (its fingerprint changed); the numbers are not comparable with its val_loss[/]")
    console.print(_metrics_table(result, f"held-out evaluation: {run_dir}"))
    console.print(f"written to {run_dir / 'eval.json'}")
    from micro_arch.eval.context import extended_from

    if extended_from(run_dir) is not None:  # a context-extension run: the loss at the parent's length too
        from micro_arch.data import prepare_data
        from micro_arch.device import resolve_device
        from micro_arch.eval.context import context_lines
        from micro_arch.rundir import load_run

        device = resolve_device(device, option="--device")
        cfg, model, _ = load_run(run_dir, checkpoint, device)
        for line in context_lines(run_dir, model, prepare_data(cfg.data).val, result["seq_len"], batch_size,
                                  device, max_batches):
            console.print(line)


def _metrics_table(result: dict, title: str):
    from rich.table import Table

    from micro_arch.report.fairness import standard_error

    losses = result["batch_losses"]
    se = standard_error(losses)
    spread = "" if se is None else f" ± {se:.4f}"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result['val_loss']:.4f}{spread}")
    table.add_row("perplexity", f"{result['perplexity']:.3f}")
    bpb = result["bits_per_byte"]
    table.add_row("bits per byte", "n/a" if bpb is None else f"{bpb:.4f}")
    table.add_row("top-1 accuracy", f"{result['top1']:.2%}")
    table.add_row("top-5 accuracy", f"{result['top5']:.2%}")
    table.add_row("tokens", f"{result['n_tokens']:,} in {len(losses)} batches")
    return table
