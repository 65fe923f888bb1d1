"""Training batches: where they come from (a batch source) and how they reach the device (the prefetcher).

A batch source has `batch(index) -> tuple` of CPU tensors (other values pass through), where
index = step * grad_accum + micro: a pure function of the index, so a resumed run and N processes see
what one uninterrupted process sees. Later stages bring their own source (conversations, pairs).
"""

from __future__ import annotations

import torch

from micro_arch.config import TrainConfig
from micro_arch.data.batches import check_length, sample_batch


class TokenWindows:
    """Pretraining: random windows of the token array, this rank's rows of the global batch."""

    def __init__(self, tokens, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        check_length(len(tokens), cfg.seq_len, "training split")
        self.tokens, self.cfg, self.rank, self.world_size = tokens, cfg, rank, world_size

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg
        return sample_batch(self.tokens, t.batch_size, t.seq_len, t.data_order_seed, index, self.rank,
                            self.world_size)


class Prefetcher:
    """The batches of step s+1 are sampled, and on CUDA copied from pinned memory asynchronously, right after
    step s has been queued, so the host prepares them while the device computes.

        batches = prefetcher.take(step)      # on the device
        ... queue the step ...
        prefetcher.prepare(step + 1)
    """

    def __init__(self, source, grad_accum: int, device: torch.device):
        self.source, self.grad_accum, self.device = source, grad_accum, device
        self.pin = device.type == "cuda"
        self._ready: tuple[int, list] | None = None

    def _to_device(self, value):
        if isinstance(value, torch.Tensor):
            if self.pin:
                return value.pin_memory().to(self.device, non_blocking=True)
            return value.to(self.device)
        if isinstance(value, (tuple, list)):
            return type(value)(self._to_device(v) for v in value)
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        return value

    def prepare(self, step: int) -> None:
        first = step * self.grad_accum
        self._ready = (step, [self._to_device(self.source.batch(first + m)) for m in range(self.grad_accum)])

    def take(self, step: int) -> list:
        if self._ready is None or self._ready[0] != step:
            self.prepare(step)
        batches = self._ready[1]
        self._ready = None
        return batches
