"""`micro-arch eval RUN_DIR` for an SFT or DPO run: its held-out measurement, next to the same measurement
of the weights it started from (model.init_from), so that one command shows what the stage changed.

SFT: nats per assistant token over every held-out conversation. DPO: over every held-out pair, the DPO loss,
the implicit-reward preference accuracy and margin (against the frozen init_from reference: 0 for the
reference itself, by definition), and the likelihood accuracy (the share of pairs whose chosen answer gets
the higher log-probability), which is defined for any model and so compares before and after.
"""

from __future__ import annotations

from pathlib import Path

from .setup import build_reference, first_rows


def evaluate_stage_run(run_dir, checkpoint=None, batch_size: int = 32, device: str = "auto",
                       max_batches: int | None = None) -> dict:
    """Before/after metrics on the held-out conversations or pairs (the first max_batches * batch_size of
    them when max_batches is set); also written to RUN_DIR/stage_eval.json."""
    from micro_arch.device import resolve_device
    from micro_arch.rundir import load_run, write_json

    run_dir = Path(run_dir)
    device = resolve_device(device, option="--device")
    cfg, model, _ = load_run(run_dir, checkpoint, device)
    from micro_arch.stages import stage_of

    stage = stage_of(cfg)
    data = stage.prepare_data(cfg)
    start = build_reference(cfg, device, run_dir, evaluating=True)  # the init_from weights, as the run began
    t = cfg.train
    if max_batches is not None:
        data.val = first_rows(data.val, max_batches * batch_size)
    before, after = stage.before_and_after(start, model, data.val, batch_size, device, t)
    held_out = data.notes[1] + (f" (the first {len(data.val)} evaluated)" if max_batches is not None else "")
    result = {"stage": t.stage, "init_from": cfg.model.init_from, "held_out": held_out,
              "before": before, "after": after}
    write_json(run_dir / "stage_eval.json", result)
    return result


def print_stage_eval(console, run_dir, result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{result['stage'].upper()} held-out evaluation: {run_dir}")
    table.add_column("metric")
    table.add_column("init_from (before)", justify="right")
    table.add_column("this run (after)", justify="right")
    for key, value in result["after"].items():
        if isinstance(value, float):
            table.add_row(key, f"{result['before'][key]:.4f}", f"{value:.4f}")
        else:
            table.add_row(key, str(result["before"][key]), str(value))
    console.print(table)
    console.print(f"{result['held_out']}; written to {Path(run_dir) / 'stage_eval.json'}")
