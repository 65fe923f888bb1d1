"""The small object that travels beside the residual stream through every block.

Blocks map (batch, seq, d_model) -> same shape; anything else they need or produce goes here:
positions (for RoPE), a generation cache (KV for attention, recurrent state for SSMs),
auxiliary losses (MoE load balancing), named statistics for logs, and an optional recorder that
`micro-arch trace` uses to show the shapes inside a block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class BlockState:
    positions: torch.Tensor | None = None  # (seq,) absolute positions of the current tokens
    cache: dict | None = None  # generation cache, one entry per block module: cache[module] = anything
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # summed into the training loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-d, read at log time; never differentiated
    recorder: Callable[[str, torch.Tensor], None] | None = None
    start: int | None = None  # positions[0] as a Python int, set by Model.forward: blocks never read a tensor back

    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def record(self, name: str, tensor: torch.Tensor) -> None:
        """Report an intermediate tensor (e.g. 'q', 'scores') to the shape tracer; free when not tracing."""
        if self.recorder is not None:
            self.recorder(name, tensor)

    @property
    def offset(self) -> int:
        """Position of the first current token (non-zero while decoding with a cache)."""
        if self.start is not None:
            return self.start
        return 0 if self.positions is None else int(self.positions[0])
