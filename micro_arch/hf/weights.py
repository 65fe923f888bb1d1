"""Weights between micro-arch names and transformers' in-memory names, both ways, per layout family.

RoPE: blocks/attention.py rotates interleaved pairs (2j, 2j+1) of each head; transformers' Llama family
rotates halves (j, j + head_dim/2). Both use frequency j for pair j, so the q and k rows of each head are
permuted (even rows first, then odd rows), as transformers' own Llama conversion does the other way round.
"""

from __future__ import annotations

import torch

from micro_arch.hf.layouts import Layout


def interleaved_to_halves(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    shape = w.shape
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(shape)


def halves_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    shape = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(shape)


def _block(i: int, j: int) -> str:
    return f"layers.{i}.branches.0.blocks.{j}."


def _ends(sd: dict, prefix: str, final: str) -> dict:
    out = {f"{prefix}{final}.weight": sd["final_norm.blocks.0.weight"], "lm_head.weight": sd["head.weight"]}
    if "final_norm.blocks.0.bias" in sd:
        out[f"{prefix}{final}.bias"] = sd["final_norm.blocks.0.bias"]
    return out


def to_hf(layout: Layout, sd: dict) -> dict:
    """micro-arch state dict -> the transformers model's state dict (every tensor a fresh copy)."""
    sd = {k: v.detach().clone() for k, v in sd.items()}
    if layout.family == "gpt2":
        return _gpt2_to_hf(layout, sd)
    if layout.family == "mamba":
        out = {"backbone.embeddings.weight": sd["embed.weight"], **_ends(sd, "backbone.", "norm_f")}
        for i in range(layout.n_layers):
            out[f"backbone.layers.{i}.norm.weight"] = sd[_block(i, 0) + "weight"]
            mixer = _block(i, 1)
            for key, value in sd.items():
                if key.startswith(mixer):
                    out[f"backbone.layers.{i}.mixer.{key[len(mixer):]}"] = value
        return out
    H, KV, D = layout.dims["n_heads"], layout.dims["n_kv_heads"], layout.dims["head_dim"]
    out = {"model.embed_tokens.weight": sd["embed.weight"], **_ends(sd, "model.", "norm")}
    for i in range(layout.n_layers):
        p, attn, hf = _block(i, 1), f"model.layers.{i}.self_attn.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[_block(i, 0) + "weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[_block(i, 2) + "weight"]
        for kind in ("weight", "bias"):
            if p + f"qkv_proj.{kind}" not in sd:
                continue
            q, k, v = sd[p + f"qkv_proj.{kind}"].split([H * D, KV * D, KV * D])
            out[attn + f"q_proj.{kind}"] = interleaved_to_halves(q, H, D)
            out[attn + f"k_proj.{kind}"] = interleaved_to_halves(k, KV, D)
            out[attn + f"v_proj.{kind}"] = v
            out[attn + f"o_proj.{kind}"] = sd[p + f"out_proj.{kind}"]
        if p + "q_norm" in sd:
            out[attn + "q_norm.weight"] = interleaved_to_halves(sd[p + "q_norm"], 1, D)
            out[attn + "k_norm.weight"] = interleaved_to_halves(sd[p + "k_norm"], 1, D)
        f = _block(i, 3)
        if layout.family in ("mixtral", "qwen2_moe"):
            out[hf + "mlp.gate.weight"] = sd[f + "router.weight"]
            out[hf + "mlp.experts.gate_up_proj"] = sd[f + "w_in"].transpose(1, 2).contiguous()
            out[hf + "mlp.experts.down_proj"] = sd[f + "w_out"].transpose(1, 2).contiguous()
            if layout.family == "qwen2_moe":  # a shared expert of width 0: it adds exactly nothing
                d = sd[f + "router.weight"].shape[1]
                for name, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                    out[hf + f"mlp.shared_expert.{name}.weight"] = torch.zeros(shape)
                out[hf + "mlp.shared_expert_gate.weight"] = torch.zeros(1, d)
            continue
        for kind in ("weight", "bias"):
            if f + f"in_proj.{kind}" in sd:
                gate, up = sd[f + f"in_proj.{kind}"].chunk(2)
                out[hf + f"mlp.gate_proj.{kind}"], out[hf + f"mlp.up_proj.{kind}"] = gate, up
                out[hf + f"mlp.down_proj.{kind}"] = sd[f + f"out_proj.{kind}"]
    return out


def _gpt2_to_hf(layout: Layout, sd: dict) -> dict:
    """GPT-2 stores Conv1D weights as (in, out); biases micro-arch left out are zeros there."""
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"]}
    final = {"transformer.ln_f.weight": sd["final_norm.blocks.0.weight"], "lm_head.weight": sd["head.weight"]}
    final["transformer.ln_f.bias"] = sd.get("final_norm.blocks.0.bias", torch.zeros_like(final["transformer.ln_f.weight"]))
    out.update(final)
    for i in range(layout.n_layers):
        h = f"transformer.h.{i}."
        pairs = (("ln_1", 0, None), ("attn.c_attn", 1, "qkv_proj"), ("attn.c_proj", 1, "out_proj"),
                 ("ln_2", 2, None), ("mlp.c_fc", 3, "up_proj"), ("mlp.c_proj", 3, "out_proj"))
        for hf_name, j, ours in pairs:
            p = _block(i, j) + (f"{ours}." if ours else "")
            weight = sd[p + "weight"]
            out[h + hf_name + ".weight"] = weight if ours is None else weight.t().contiguous()
            bias = sd.get(p + "bias")
            out[h + hf_name + ".bias"] = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return out


def from_hf(layout: Layout, hf: dict) -> dict:
    """A transformers model's state dict -> micro-arch names (the model built from config_from_hf)."""
    hf = {k: v.detach().clone() for k, v in hf.items()}
    out = {}
    if layout.family == "gpt2":
        out = {"embed.weight": hf["transformer.wte.weight"], "pos_embed.weight": hf["transformer.wpe.weight"],
               "final_norm.blocks.0.weight": hf["transformer.ln_f.weight"],
               "final_norm.blocks.0.bias": hf["transformer.ln_f.bias"]}
        for i in range(layout.n_layers):
            h = f"transformer.h.{i}."
            for hf_name, j, ours in (("ln_1", 0, None), ("attn.c_attn", 1, "qkv_proj"), ("attn.c_proj", 1, "out_proj"),
                                     ("ln_2", 2, None), ("mlp.c_fc", 3, "up_proj"), ("mlp.c_proj", 3, "out_proj")):
                p = _block(i, j) + (f"{ours}." if ours else "")
                weight = hf[h + hf_name + ".weight"]
                out[p + "weight"] = weight if ours is None else weight.t().contiguous()
                out[p + "bias"] = hf[h + hf_name + ".bias"]
    elif layout.family == "mamba":
        out = {"embed.weight": hf["backbone.embeddings.weight"], "final_norm.blocks.0.weight": hf["backbone.norm_f.weight"]}
        for i in range(layout.n_layers):
            out[_block(i, 0) + "weight"] = hf[f"backbone.layers.{i}.norm.weight"]
            mixer = f"backbone.layers.{i}.mixer."
            for key, value in hf.items():
                if key.startswith(mixer):
                    out[_block(i, 1) + key[len(mixer):]] = value
    else:
        out = _llama_from_hf(layout, hf)
    out["head.weight"] = hf.get("lm_head.weight", out["embed.weight"])
    return out


def _llama_from_hf(layout: Layout, hf: dict) -> dict:
    H, KV, D = layout.dims["n_heads"], layout.dims["n_kv_heads"], layout.dims["head_dim"]
    out = {"embed.weight": hf["model.embed_tokens.weight"], "final_norm.blocks.0.weight": hf["model.norm.weight"]}
    for i in range(layout.n_layers):
        p, attn, h = _block(i, 1), f"model.layers.{i}.self_attn.", f"model.layers.{i}."
        out[_block(i, 0) + "weight"] = hf[h + "input_layernorm.weight"]
        out[_block(i, 2) + "weight"] = hf[h + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            if attn + f"q_proj.{kind}" not in hf:
                continue
            q = halves_to_interleaved(hf[attn + f"q_proj.{kind}"], H, D)
            k = halves_to_interleaved(hf[attn + f"k_proj.{kind}"], KV, D)
            out[p + f"qkv_proj.{kind}"] = torch.cat([q, k, hf[attn + f"v_proj.{kind}"]])
            out[p + f"out_proj.{kind}"] = hf[attn + f"o_proj.{kind}"]
        if attn + "q_norm.weight" in hf:
            out[p + "q_norm"] = halves_to_interleaved(hf[attn + "q_norm.weight"], 1, D)
            out[p + "k_norm"] = halves_to_interleaved(hf[attn + "k_norm.weight"], 1, D)
        f = _block(i, 3)
        if layout.family in ("mixtral", "qwen2_moe"):
            out[f + "router.weight"] = hf[h + "mlp.gate.weight"]
            out[f + "w_in"] = hf[h + "mlp.experts.gate_up_proj"].transpose(1, 2).contiguous()
            out[f + "w_out"] = hf[h + "mlp.experts.down_proj"].transpose(1, 2).contiguous()
            out[f + "expert_bias"] = torch.zeros(layout.dims["n_experts"])
            continue
        for kind in ("weight", "bias"):
            if h + f"mlp.gate_proj.{kind}" in hf:
                out[f + f"in_proj.{kind}"] = torch.cat([hf[h + f"mlp.gate_proj.{kind}"], hf[h + f"mlp.up_proj.{kind}"]])
                out[f + f"out_proj.{kind}"] = hf[h + f"mlp.down_proj.{kind}"]
    return out
