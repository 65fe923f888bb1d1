"""Model assembly: token embedding -> layers built from block strings -> final norm -> LM head.

Written for one device, nanoGPT-style; parallelism (DDP) and compilation are applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from micro_arch.config import ModelConfig
from micro_arch.errors import MicroArchError
from micro_arch.model.registry import DIM_NAMES, Dims
from micro_arch.model.spec import ADD, branch_where, build_step, format_chain, resolve_chain, resolve_layer
from micro_arch.model.state import BlockState

# The shared dimensions a block may ask for, read from the model config under the same names; the others are
# computed per model (head_dim's default) or per layer. tests/test_model.py checks each is a ModelConfig field.
DIMS_FROM_CONFIG = tuple(n for n in DIM_NAMES if n not in ("head_dim", "n_layers", "layer_idx"))


def layer_dims(cfg: ModelConfig, layer_idx: int) -> Dims:
    """The shared dimensions the blocks of layer `layer_idx` receive (n_layers: the final norm's index): the
    ModelConfig fields of the same names, head_dim's default, and the layer's place."""
    return Dims(**{name: getattr(cfg, name) for name in DIMS_FROM_CONFIG},
                head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads, n_layers=sum(g.repeat for g in cfg.layers),
                layer_idx=layer_idx)


class Chain(nn.Module):
    """One branch: `h = block(h)` for each block, `x = x + h; h = x` at each '+'; returns h."""

    def __init__(self, steps, dims: Dims, where: str = ""):
        super().__init__()
        self.spec = format_chain(steps)
        self.blocks = nn.ModuleList(build_step(s, dims, where) for s in steps if s != ADD)
        plan, index = [], 0  # -1: a residual add; otherwise the index of the block to run
        for step in steps:
            plan.append(-1 if step == ADD else index)
            index += step != ADD
        self.plan = tuple(plan)

    def forward(self, x, state):
        h = x
        for i in self.plan:
            if i < 0:
                x = x + h
                h = x
            else:
                h = self.blocks[i](h, state)
        return h

    def extra_repr(self):
        return repr(self.spec)


class Layer(nn.Module):
    """Parallel branches on the same input, residual updates summed: x + sum_b (branch_b(x) - x)."""

    def __init__(self, branches: list[Chain]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x, state):
        if len(self.branches) == 1:
            return self.branches[0](x, state)
        out = x
        for branch in self.branches:
            out = out + (branch(x, state) - x)
        return out


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # cross-entropy + auxiliary losses: what training differentiates
    ce_loss: torch.Tensor | None = None
    aux_losses: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise MicroArchError("model.vocab_size is not set; it normally comes from the tokenizer")
        self.cfg = cfg
        n_layers = sum(g.repeat for g in cfg.layers)
        dims = lambda i: layer_dims(cfg, i)  # noqa: E731
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        layers, n_adds = [], 0
        for g, group in enumerate(cfg.layers):
            where = f"model.layers[{g}].spec"
            resolved = resolve_layer(group.spec, cfg.defaults, where)
            n_adds += group.repeat * sum(step == ADD for branch in resolved for step in branch)
            for _ in range(group.repeat):
                layers.append(Layer([Chain(branch, dims(len(layers)), branch_where(where, group.spec, b))
                                     for b, branch in enumerate(resolved)]))
        self.layers = nn.ModuleList(layers)
        self.final_norm = None
        if cfg.final_norm:
            try:
                steps = resolve_chain(cfg.final_norm, cfg.defaults)
            except MicroArchError as err:
                raise MicroArchError(f"model.final_norm: {err}", where="model.final_norm") from None
            self.final_norm = Chain(steps, dims(n_layers), "model.final_norm")
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights(max(n_adds, 1))

    def init_weights(self, n_residual_adds: int) -> None:
        """GPT-2 practice: normal(0, std) everywhere, residual output projections scaled down by
        1/sqrt(number of residual adds); blocks with special parameters then re-init their own."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(n_residual_adds))
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                state: BlockState | None = None, last_only: bool = False) -> ModelOutput:
        B, T = idx.shape
        state = state if state is not None else BlockState()
        offset = 0 if state.positions is None else int(state.positions[0])  # the one read per forward
        if offset + T > self.cfg.max_seq_len:
            raise MicroArchError(f"sequence of {offset + T} tokens is longer than model.max_seq_len="
                                 f"{self.cfg.max_seq_len}; shorten it or raise model.max_seq_len")
        state.positions = torch.arange(offset, offset + T, device=idx.device)
        state.start = offset
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(state.positions)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, state)
        if self.final_norm is not None:
            x = self.final_norm(x, state)
        if last_only:
            x = x[:, -1:]
        logits = self.head(x)
        out = ModelOutput(logits, aux_losses=state.aux_losses, stats=state.stats)
        if targets is not None:
            out.ce_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                          ignore_index=-1)
            out.loss = out.ce_loss + sum(state.aux_losses.values()) if state.aux_losses else out.ce_loss
        return out

    # --- accounting ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (shared ones once); non_embedding leaves out token/position embeddings and
        an untied LM head, as in the scaling-law literature."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
            if self.pos_embed is not None:
                total -= self.pos_embed.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of a sequence of `seq_len` tokens: 3x the forward pass (the backward
        multiplies by each weight twice: for the input's gradient and the weight's).

        The forward counts matrix products only, 2 FLOPs per multiply-add, as FlopCounterMode and the
        6N rule do: each weight matrix of the layers and the LM head (not the embedding lookups), and
        attention's QK^T and AV over the (query, key) pairs its mask allows: on average (seq_len + 1) / 2
        keys per query for causal attention, and for a window w, min(t + 1, w) keys at position t. That is
        the work of a kernel that skips masked blocks (FlashAttention does for causal masks); charging the
        full seq_len^2 square would make a sliding window cost as much as full attention. Elementwise work
        (norms, activations, softmax, rotary, residual adds, a Mamba scan's decays and updates) is not
        counted anywhere. Blocks whose products differ from 2 x their parameters (attention: its scores; MoE:
        the router and the top-k experts only; Mamba: its scan's read-out and a padded convolution) define
        `forward_flops_per_token(seq_len)`. tests/test_flops.py checks all of it against FlopCounterMode."""
        forward = 2 * self.head.weight.numel()
        counted = set()
        for module in self.modules():  # parents first: a block's own count covers its submodules
            own = {id(p) for p in module.parameters()}
            if hasattr(module, "forward_flops_per_token") and not own & counted:
                forward += module.forward_flops_per_token(seq_len)
                counted |= own
        for p in self.parameters():
            if id(p) in counted or p is self.embed.weight or p is self.head.weight or p.dim() < 2:
                continue
            if self.pos_embed is not None and p is self.pos_embed.weight:
                continue
            forward += 2 * p.numel()
        return 3.0 * forward
