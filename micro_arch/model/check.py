"""An experiment's blocks, checked once when it is loaded, before any work: every block string resolves, every
block builds with its arguments, and every block maps (batch, seq, d_model) to that same shape.

The blocks are built on the meta device (shapes only: no memory, no initialisation, no random numbers drawn)
and each runs once on a meta input, so a user's block that returns the wrong width is named with its spec
here rather than by torch's shape error at the next operation, and no training step pays for the check. One
layer per layer group is checked (its first); a block that cannot run on meta tensors (a host read such as
.item() or .tolist(), an operator without a meta kernel) is left to its first real forward.
"""

from __future__ import annotations

import torch

from micro_arch.config import ModelConfig
from micro_arch.errors import MicroArchError
from micro_arch.model.model import layer_dims
from micro_arch.model.registry import Dims
from micro_arch.model.spec import (
    ADD,
    BlockCall,
    branch_where,
    build_step,
    resolve_chain,
    resolve_layer,
    spec_error,
)
from micro_arch.model.state import BlockState

PROBE_TOKENS = 8  # the meta input's length (at most model.max_seq_len)


def check_blocks(cfg: ModelConfig) -> None:
    """A MicroArchError about the first block string, block argument or block output shape that is wrong; its
    `where` is the config key (model.layers[i].spec, model.final_norm) for blaming a file or an override."""
    first = 0
    for g, group in enumerate(cfg.layers):
        where = f"model.layers[{g}].spec"
        for b, steps in enumerate(resolve_layer(group.spec, cfg.defaults, where)):
            check_chain(steps, layer_dims(cfg, first), branch_where(where, group.spec, b))
        first += group.repeat
    if cfg.final_norm:
        try:
            steps = resolve_chain(cfg.final_norm, cfg.defaults)
        except MicroArchError as err:
            raise err.reworded(f"model.final_norm: {err}", where="model.final_norm") from None
        check_chain(steps, layer_dims(cfg, first), "model.final_norm")


def check_chain(steps: list, dims: Dims, where: str) -> None:
    """Build each block of a resolved chain on the meta device and check what it returns for (1, T, d_model)."""
    seq = min(PROBE_TOKENS, dims.max_seq_len)
    with torch.device("meta"):
        x = torch.empty(1, seq, dims.d_model)
        for step in steps:
            if step == ADD:
                continue
            block = build_step(step, dims, where)
            try:
                with torch.no_grad():
                    out = block(x, BlockState(positions=torch.arange(seq), start=0))
            except Exception:  # noqa: BLE001 - cannot run on meta tensors: the first real forward will tell
                continue
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                raise _wrong_shape(step, x, out, where)


def _wrong_shape(step: BlockCall, x: torch.Tensor, out, where: str) -> MicroArchError:
    got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
    message = (f"{where}: block {step.name!r} returns {got} for an input of shape {tuple(x.shape)}; a block must "
               "map (batch, seq, d_model) to the same shape")
    located = spec_error(step.text, step.position, message) if step.text else MicroArchError(message)
    return located.reworded(str(located), where=where)
