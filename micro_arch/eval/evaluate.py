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
    device = resolve_device(device, option="--device")
    cfg, model, tokenizer = load_run(run_dir, checkpoint, device)
    from micro_arch.stages import stage_of

    stage = stage_of(cfg)
    if stage.is_chat:
        raise MicroArchError(f"{run_dir}: a train.stage={stage.name} run is measured on held-out "
                             f"{stage.records}, not text: "
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
