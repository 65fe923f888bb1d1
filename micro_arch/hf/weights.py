"""Weights between micro-arch names and transformers' in-memory names, per layout family, both ways.

Each family is one table of rules (`rules(layout)`); `to_hf` reads it left to right, `from_hf` right to left,
so a name is written once. A rule whose source tensors are not all there is skipped (biases, QK-norms and
norm biases are optional).

RoPE: blocks/attention.py rotates interleaved pairs (2j, 2j+1) of each head; transformers' Llama family
rotates halves (j, j + head_dim/2). Both use frequency j for pair j, so the q and k rows of each head are
permuted (even rows first, then odd rows), as transformers' own Llama conversion does the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from micro_arch.hf.layouts import Layout


def interleaved_to_halves(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    shape = w.shape
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(shape)


def halves_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    shape = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(shape)


def _same(*tensors):
    return tensors


def _transposed(w):  # GPT-2's Conv1D stores (in, out); MoE experts are stored (experts, in, out) there
    return (w.transpose(-2, -1).contiguous(),)


def _zero_bias(w):
    return (w.new_zeros(w.shape[0]),)


@dataclass(frozen=True)
class Rule:
    """Our tensors <-> theirs: `out` maps ours to theirs (export), `back` theirs to ours (import); None where
    that direction writes nothing. `prefix`: every name under ours[0] is theirs[0] + the same rest."""
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    out: Callable | None = _same
    back: Callable | None = _same
    prefix: bool = False


def one(ours: str, theirs: str, out=_same, back=_same) -> Rule:
    return Rule((ours,), (theirs,), out, back)


def _block(i: int, j: int) -> str:
    return f"layers.{i}.branches.0.blocks.{j}."


def _ends(norm: str) -> list[Rule]:
    return [one("final_norm.blocks.0.weight", f"{norm}.weight"), one("final_norm.blocks.0.bias", f"{norm}.bias"),
            one("head.weight", "lm_head.weight")]


def _llama_rules(layout: Layout) -> list[Rule]:
    """Llama, Qwen3, Mistral, Mixtral, Qwen2-MoE and Qwen3-MoE (the three MoE families store experts alike; the
    Qwen-MoE dense layers, dims['dense_layers'], store their MLP as Llama does)."""
    H, KV, D = layout.dims["n_heads"], layout.dims["n_kv_heads"], layout.dims["head_dim"]

    def split_qkv(w):
        q, k, v = w.split([H * D, KV * D, KV * D])
        return interleaved_to_halves(q, H, D), interleaved_to_halves(k, KV, D), v

    def join_qkv(q, k, v):
        return (torch.cat([halves_to_interleaved(q, H, D), halves_to_interleaved(k, KV, D), v]),)

    def no_shared_expert(router):  # Qwen2-MoE's shared expert at width 0 (and gate 0): it adds exactly nothing
        d = router.shape[1]
        return torch.zeros(0, d), torch.zeros(0, d), torch.zeros(d, 0), torch.zeros(1, d)

    rules = [one("embed.weight", "model.embed_tokens.weight"), *_ends("model.norm")]
    for i in range(layout.n_layers):
        p, f, h = _block(i, 1), _block(i, 3), f"model.layers.{i}."
        a = h + "self_attn."
        rules += [one(_block(i, 0) + "weight", h + "input_layernorm.weight"),
                  one(_block(i, 2) + "weight", h + "post_attention_layernorm.weight")]
        for kind in ("weight", "bias"):
            rules += [Rule((p + f"qkv_proj.{kind}",), tuple(a + f"{n}_proj.{kind}" for n in "qkv"), split_qkv, join_qkv),
                      one(p + f"out_proj.{kind}", a + f"o_proj.{kind}")]
        for n in "qk":
            rules.append(one(p + f"{n}_norm", a + f"{n}_norm.weight", lambda w: (interleaved_to_halves(w, 1, D),),
                             lambda w: (halves_to_interleaved(w, 1, D),)))
        if layout.family not in ("mixtral", "qwen2_moe", "qwen3_moe") or i in layout.dims.get("dense_layers", ()):
            for kind in ("weight", "bias"):
                rules += [Rule((f + f"in_proj.{kind}",), (h + f"mlp.gate_proj.{kind}", h + f"mlp.up_proj.{kind}"),
                               lambda w: w.chunk(2), lambda gate, up: (torch.cat([gate, up]),)),
                          one(f + f"out_proj.{kind}", h + f"mlp.down_proj.{kind}")]
            continue
        rules += [one(f + "router.weight", h + "mlp.gate.weight"),
                  one(f + "w_in", h + "mlp.experts.gate_up_proj", _transposed, _transposed),
                  one(f + "w_out", h + "mlp.experts.down_proj", _transposed, _transposed),
                  one(f + "expert_bias", h + "mlp.gate.weight", None, lambda g: (torch.zeros(g.shape[0]),))]
        if layout.family == "qwen2_moe":
            shared = tuple(h + f"mlp.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))
            rules.append(Rule((f + "router.weight",), (*shared, h + "mlp.shared_expert_gate.weight"),
                              no_shared_expert, None))
    return rules


def _gpt2_rules(layout: Layout) -> list[Rule]:
    """Biases micro-arch left out export as zeros: each zero-filling rule comes before the bias it stands for."""
    rules = [one("embed.weight", "transformer.wte.weight"), one("pos_embed.weight", "transformer.wpe.weight"),
             one("final_norm.blocks.0.weight", "transformer.ln_f.bias", _zero_bias, None), *_ends("transformer.ln_f")]
    for i in range(layout.n_layers):
        for theirs, j, ours in (("ln_1", 0, None), ("attn.c_attn", 1, "qkv_proj"), ("attn.c_proj", 1, "out_proj"),
                                ("ln_2", 2, None), ("mlp.c_fc", 3, "up_proj"), ("mlp.c_proj", 3, "out_proj")):
            p, t = _block(i, j) + (f"{ours}." if ours else ""), f"transformer.h.{i}.{theirs}."
            weight = _same if ours is None else _transposed
            rules += [one(p + "weight", t + "weight", weight, weight), one(p + "weight", t + "bias", _zero_bias, None),
                      one(p + "bias", t + "bias")]
    return rules


def _mamba_rules(layout: Layout) -> list[Rule]:
    rules = [one("embed.weight", "backbone.embeddings.weight"), *_ends("backbone.norm_f")]
    for i in range(layout.n_layers):
        rules += [one(_block(i, 0) + "weight", f"backbone.layers.{i}.norm.weight"),
                  Rule((_block(i, 1),), (f"backbone.layers.{i}.mixer.",), prefix=True)]
    return rules


def rules(layout: Layout) -> list[Rule]:
    return {"gpt2": _gpt2_rules, "mamba": _mamba_rules}.get(layout.family, _llama_rules)(layout)


def _apply(table: list[Rule], state: dict, export: bool) -> dict:
    state = {k: v.detach().clone() for k, v in state.items()}
    out = {}
    for rule in table:
        source, target, fn = (rule.ours, rule.theirs, rule.out) if export else (rule.theirs, rule.ours, rule.back)
        if rule.prefix:
            out.update({target[0] + k[len(source[0]):]: v for k, v in state.items() if k.startswith(source[0])})
        elif fn is not None and all(k in state for k in source):
            out.update(zip(target, fn(*(state[k] for k in source)), strict=True))
    return out


def to_hf(layout: Layout, sd: dict) -> dict:
    """micro-arch state dict -> the transformers model's state dict (every tensor a fresh copy)."""
    return _apply(rules(layout), sd, export=True)


def from_hf(layout: Layout, hf: dict) -> dict:
    """A transformers model's state dict -> micro-arch names (the model built from config_from_hf)."""
    out = _apply(rules(layout), hf, export=False)
    out.setdefault("head.weight", out["embed.weight"])  # tied: transformers may leave lm_head out
    return out
