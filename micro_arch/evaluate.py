"""Held-out evaluation: loss, perplexity, bits per byte and top-1/top-5 teacher-forcing accuracy.

Unlike the trainer's quick estimate on a few random windows, this covers the held-out split with
non-overlapping contiguous windows (each token predicted once, with the context its window gives it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from micro_arch.device import autocast
from micro_arch.errors import MicroArchError


@torch.no_grad()
def evaluate(model, tokens, seq_len: int, batch_size: int, device, max_batches: int | None = None,
             precision: str = "fp32", tokenizer=None, val_bytes: int | None = None) -> dict:
    """Metrics over the windows of data.iter_eval_windows (targets of -1 are padding and not counted).

    Bits per byte = total nats / (ln 2 * UTF-8 bytes of the predicted text): the bytes are counted
    exactly by decoding the predicted tokens when `tokenizer` is given; otherwise they are
    approximated as val_bytes scaled by the share of the split's tokens predicted.
    """
    from micro_arch.data import iter_eval_windows
    from micro_arch.errors import MicroArchError

    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise MicroArchError(f"evaluation needs batch_size >= 1 and max_batches >= 1 (or unset), got "
                             f"batch_size={batch_size}, max_batches={max_batches}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_nats, n_tokens, top1, top5 = 0.0, 0, 0, 0
    batch_losses, predicted = [], []
    try:
        for x, y in iter_eval_windows(tokens, batch_size, seq_len, max_batches=max_batches):
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                logits = model(x).logits
            logits, valid = logits.float(), y != -1
            nats = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                                   reduction="sum").item()
            count = int(valid.sum())
            ranked = logits.topk(min(5, logits.size(-1)), dim=-1).indices
            hits = (ranked == y[..., None]) & valid[..., None]
            top1 += int(hits[..., 0].sum())
            top5 += int(hits.any(-1).sum())
            total_nats += nats
            n_tokens += count
            batch_losses.append(nats / max(count, 1))
            if tokenizer is not None:
                predicted.extend(y[valid].tolist())
    finally:
        model.train(was_training)
    if n_tokens == 0:
        from micro_arch.errors import MicroArchError

        raise MicroArchError(f"the held-out split ({len(tokens)} tokens) is too short to evaluate")
    loss = total_nats / n_tokens
    if tokenizer is not None:
        # decoded in one piece: decoding window by window could lose the spaces SentencePiece puts at joins
        n_bytes = len(tokenizer.decode(predicted).encode("utf-8"))
    elif val_bytes is not None:
        n_bytes = val_bytes * n_tokens / max(len(tokens) - 1, 1)
    else:
        n_bytes = None
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nats / (math.log(2) * n_bytes) if n_bytes else None,
        "top1": top1 / n_tokens,
        "top5": top5 / n_tokens,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "batch_losses": batch_losses,
    }


def evaluation_stamp(run_dir, checkpoint=None, batch_size: int = 32, max_batches: int | None = None) -> dict:
    """What an evaluation was computed from: which state of the checkpoint file, and how much of the split.
    Equal stamps mean eval.json can be reused as it is."""
    from micro_arch.checkpoint import latest_checkpoint, resolve_checkpoint

    stat = (resolve_checkpoint(run_dir, checkpoint) if checkpoint else latest_checkpoint(run_dir)).stat()
    return {"checkpoint_bytes": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
            "batch_size": batch_size, "max_batches": max_batches}


def evaluate_run(run_dir, checkpoint=None, batch_size: int = 32, max_batches: int | None = None,
                 device: str = "auto") -> dict:
    """Evaluate a run's checkpoint on its held-out split and write eval.json (stamped with
    evaluation_stamp) into the run directory."""
    from micro_arch.data import prepare_data
    from micro_arch.device import resolve_device
    from micro_arch.rundir import load_run, write_json

    run_dir = Path(run_dir)
    device = resolve_device(device)
    cfg, model, tokenizer = load_run(run_dir, checkpoint, device)
    if cfg.train.stage != "pretrain":
        raise MicroArchError(f"{run_dir}: a train.stage={cfg.train.stage} run is measured on held-out "
                             f"{'conversations' if cfg.train.stage == 'sft' else 'preference pairs'}, not text: "
                             "`micro-arch eval RUN_DIR` reports it before and after the stage; to rank it against "
                             "other runs on text, use `micro-arch compare RUN_DIR... --data SOURCE`")
    data = prepare_data(cfg.data)
    seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
    result = evaluate(model, data.val, seq_len, batch_size, device, max_batches=max_batches,
                      tokenizer=tokenizer)
    result |= {"data_fingerprint": data.fingerprint, "tokenizer": tokenizer.name,
               "checkpoint": str(checkpoint) if checkpoint else "checkpoints/latest.pt", "seq_len": seq_len,
               "evaluated": evaluation_stamp(run_dir, checkpoint, batch_size, max_batches)}
    write_json(run_dir / "eval.json", result)
    return result


def _note_unfinished(console, run_dir: Path) -> None:
    """An interrupted, running or crashed run is evaluated at its latest checkpoint; say which it is."""
    from rich.markup import escape

    from micro_arch.report_runs import unfinished_state

    state = unfinished_state(run_dir)
    if state:
        console.print(f"[yellow]note[/]: {escape(state)}; evaluating its latest checkpoint")


def eval_command(args) -> None:
    """`micro-arch eval RUN_DIR`: evaluate, write eval.json, print a table."""
    import json

    from rich.console import Console

    console = Console()
    run_dir = Path(args.run_dir)
    _note_unfinished(console, run_dir)
    if getattr(args, "data", None):
        from micro_arch.eval_data import evaluate_on_data, unencodable_line

        result = evaluate_on_data(run_dir, args.data, args.checkpoint, args.batch_size, args.max_batches,
                                  args.device, args.text_field)
        console.print(_metrics_table(result, f"evaluation on {args.data}: {run_dir}"))
        console.print(unencodable_line(result))
        return
    from micro_arch.rundir import read_run_config

    if read_run_config(run_dir).train.stage != "pretrain":
        from micro_arch.stages.evaluate_stage import evaluate_stage_run, print_stage_eval

        print_stage_eval(console, run_dir, evaluate_stage_run(run_dir, args.checkpoint, args.batch_size, args.device,
                                                              args.max_batches))
        return
    result = evaluate_run(run_dir, args.checkpoint, args.batch_size, args.max_batches, args.device)
    summary = run_dir / "summary.json"
    trained_on = json.loads(summary.read_text()).get("data_fingerprint") if summary.is_file() else None
    if trained_on and trained_on != result["data_fingerprint"]:
        console.print("[yellow]warning: the held-out data differs from the data this run was trained "
                      "with (its fingerprint changed); the numbers are not comparable with its val_loss[/]")
    console.print(_metrics_table(result, f"held-out evaluation: {run_dir}"))
    console.print(f"written to {run_dir / 'eval.json'}")
    from micro_arch.stages.context import extended_from

    if extended_from(run_dir) is not None:  # a context-extension run: the loss at the parent's length too
        from micro_arch.data import prepare_data
        from micro_arch.device import resolve_device
        from micro_arch.rundir import load_run
        from micro_arch.stages.context import context_lines

        device = resolve_device(args.device)
        cfg, model, _ = load_run(run_dir, args.checkpoint, device)
        for line in context_lines(run_dir, model, prepare_data(cfg.data).val, result["seq_len"], args.batch_size,
                                  device, args.max_batches):
            console.print(line)


def _metrics_table(result: dict, title: str):
    import statistics

    from rich.table import Table

    losses = result["batch_losses"]
    spread = f" ± {statistics.stdev(losses) / math.sqrt(len(losses)):.4f}" if len(losses) > 1 else ""
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
