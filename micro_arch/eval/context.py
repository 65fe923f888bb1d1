"""Context extension: a pretrain run with model.init_from and a longer model.max_seq_len (RoPE: plain, or
with model.rope_scaling for position interpolation; learned positions: the init_from loader extends the
table). How well it worked shows in the held-out loss at the parent's length and at the new one: the same
held-out tokens, cut into windows of each length (a window's later tokens see more context)."""

from __future__ import annotations

import json
from pathlib import Path


def extended_from(run_dir) -> int | None:
    """The parent's max_seq_len when this run changed it (parent.json, written by model.init_from), else None."""
    path = Path(run_dir) / "parent.json"
    if not path.is_file():
        return None
    changed = json.loads(path.read_text()).get("changed", {}).get("max_seq_len")
    return int(changed[0]) if changed else None


def losses_at_lengths(model, tokens, lengths: list[int], batch_size: int, device, max_batches: int | None = None,
                      precision: str = "fp32") -> dict[int, float]:
    """Held-out loss (nats per token) with windows of each length over the same tokens."""
    from micro_arch.eval.evaluate import evaluate

    return {n: evaluate(model, tokens, n, batch_size, device, max_batches=max_batches, precision=precision)["val_loss"]
            for n in lengths}


def context_lines(run_dir, model, tokens, seq_len: int, batch_size: int, device, max_batches=None) -> list[str]:
    """For a context-extension run, one line per length; [] for other runs."""
    old = extended_from(run_dir)
    if old is None or old == seq_len:
        return []
    found = losses_at_lengths(model, tokens, sorted({old, seq_len}), batch_size, device, max_batches)
    return [f"held-out loss with {n}-token windows ({'the parent' if n == old else 'this run'}'s length): "
            f"{loss:.4f}" for n, loss in found.items()]
