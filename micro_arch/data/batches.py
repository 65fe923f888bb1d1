"""Batches on the training hot path: random windows for training, fixed windows for evaluation."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import torch

from micro_arch.errors import MicroArchError

from .shards import TokenStream

_VIEWS: OrderedDict[int, tuple[object, torch.Tensor, int]] = OrderedDict()
_MAX_VIEWS = 8
_SIGNED = {np.dtype(np.uint16): (np.int16, 0xFFFF), np.dtype(np.uint32): (np.int32, 0xFFFFFFFF)}


def token_view(tokens) -> tuple[torch.Tensor, int]:
    """(a torch tensor sharing the array's memory, mask that recovers the ids after widening to int64).

    torch gathers poorly from unsigned types, so uint16/uint32 ids are viewed as int16/int32 and masked
    back once widened. Cached per array, so each step does not convert anew.
    """
    if isinstance(tokens, (torch.Tensor, TokenStream)):
        return tokens, -1
    hit = _VIEWS.get(id(tokens))
    if hit is not None and hit[0] is tokens:
        _VIEWS.move_to_end(id(tokens))
        return hit[1], hit[2]
    array = np.asarray(tokens)
    signed, mask = _SIGNED.get(array.dtype, (array.dtype, -1))
    with warnings.catch_warnings():  # read-only memmaps: the tensor is only ever read
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(array.view(signed))
    _VIEWS[id(tokens)] = (tokens, view, mask)  # the entry keeps `tokens` alive, so its id stays unique
    while len(_VIEWS) > _MAX_VIEWS:
        _VIEWS.popitem(last=False)
    return view, mask


def _gather(view: torch.Tensor, mask: int, index: torch.Tensor) -> torch.Tensor:
    """One vectorised gather; only the gathered ids are widened to int64.

    torch.take, not view[index]: on a memmap-backed tensor advanced indexing is ~500x slower. A TokenStream
    (several shards) copies each row's window out of the shards it spans.
    """
    if isinstance(view, TokenStream):  # rows are consecutive positions, clamped at the end (iter_eval_windows)
        width, rows = index.shape[1], []
        for start in index[:, 0].tolist():
            row = view.window(start, min(width, len(view) - start))
            rows.append(np.pad(row, (0, width - len(row)), mode="edge") if len(row) < width else row)
        return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else index.new_zeros(index.shape)
    windows = torch.take(view, index).to(torch.int64)
    return windows & mask if mask != -1 else windows


def _windows(starts: torch.Tensor, width: int) -> torch.Tensor:
    return starts[:, None] + torch.arange(width)


def check_length(n_tokens: int, seq_len: int, what: str) -> None:
    if n_tokens <= seq_len:
        raise MicroArchError(f"train.seq_len={seq_len} is longer than the {what} ({n_tokens} tokens); lower "
                             "train.seq_len or use more text (or a larger data.val_fraction)")


def sample_batch(tokens, batch_size: int, seq_len: int, seed: int, step: int, rank: int = 0,
                 world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 of shape (batch_size, seq_len), y = x shifted by one, at offsets set by (seed, step).

    The global batch has batch_size * world_size windows and rank r takes rows [r*batch_size, (r+1)*batch_size).
    """
    view, mask = token_view(tokens)
    check_length(len(view), seq_len, "training split")
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + step) % 2**63)
    starts = torch.randint(len(view) - seq_len, (batch_size * world_size,), generator=generator)
    windows = _gather(view, mask, _windows(starts[rank * batch_size:(rank + 1) * batch_size], seq_len + 1))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(tokens, batch_size: int, seq_len: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n_batches fixed (x, y) batches of windows spread evenly over the held-out split."""
    view, mask = token_view(tokens)
    check_length(len(view), seq_len, "held-out split")
    starts = torch.linspace(0, len(view) - seq_len - 1, batch_size * n_batches).round().long()
    windows = _gather(view, mask, _windows(starts, seq_len + 1))
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows.split(batch_size)]


def iter_eval_windows(tokens, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Batches of non-overlapping contiguous windows over the whole split, each token predicted once.

    The last window is padded: inputs with 0, targets with -1 (to be ignored); the last batch may be short.
    """
    view, mask = token_view(tokens)
    starts = torch.arange(0, max(len(view) - 1, 0), seq_len)
    for i, batch in enumerate(starts.split(batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        index = _windows(batch, seq_len + 1)
        inside = index < len(view)
        windows = _gather(view, mask, index.clamp(max=len(view) - 1))
        x = torch.where(inside[:, :-1], windows[:, :-1], 0)
        y = torch.where(inside[:, 1:], windows[:, 1:], -1)
        yield x, y
