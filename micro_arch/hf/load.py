"""A local Hugging Face folder -> the micro-arch model config that computes the same function, and weights.

The inverse of micro_arch.hf.layouts: Llama, Qwen3, Mistral, Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-2 and Mamba
configs map; any setting micro-arch's blocks cannot reproduce exactly (a RoPE scaling, another activation, a
layer-dependent window, ...) is refused with its name. Qwen-MoE's dense layers (mlp_only_layers, and every
layer but each decoder_sparse_step-th) become `Norm->Attn->+->Norm->MLP->+` groups among the MoE ones. Never
touches the network.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import torch

from micro_arch.config import LayerGroup, ModelConfig
from micro_arch.errors import MicroArchError
from micro_arch.hf.layouts import HF_CLASSES, QK_NORM_EPS, Layout

PRE_NORM = "Norm->Attn->+->Norm->MLP->+"


def _call(name: str, **kwargs) -> str:
    args = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kwargs.items())
    return f"{name}({args})" if args else name


def _refuse(folder, what: str) -> MicroArchError:
    return MicroArchError(f"{folder}: cannot import: {what}")


def _need(folder, ok: bool, what: str) -> None:
    if not ok:
        raise _refuse(folder, what)


def config_from_hf(folder, hf) -> tuple[Layout, ModelConfig]:
    """(the layout, a micro-arch ModelConfig) for a transformers config object `hf`."""
    kind = hf.model_type
    families = {"llama", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "gpt2", "mamba"}
    _need(folder, kind in families, f"model_type {kind!r} has no micro-arch layout; supported: {', '.join(sorted(families))}")
    common = {"vocab_size": hf.vocab_size, "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", True))}
    if kind == "gpt2":
        _need(folder, hf.activation_function == "gelu", f"activation_function={hf.activation_function!r}: "
              "micro-arch's gelu_mlp is the exact GELU ('gelu'), not the tanh approximation")
        _need(folder, hf.scale_attn_weights and not hf.scale_attn_by_inverse_layer_idx,
              "attention scaled other than by 1/sqrt(head_dim)")
        eps = hf.layer_norm_epsilon
        cfg = ModelConfig(d_model=hf.n_embd, n_heads=hf.n_head, max_seq_len=hf.n_positions, positions="learned",
                          d_ff=hf.n_inner or 4 * hf.n_embd, layers=[LayerGroup(PRE_NORM, hf.n_layer)], **common,
                          defaults={"Norm": _call("layernorm", eps=eps), "Attn": _call("attention", bias=True),
                                    "MLP": "gelu_mlp"})
        dims = {"n_heads": hf.n_head, "n_kv_heads": hf.n_head, "head_dim": hf.n_embd // hf.n_head}
        return Layout("gpt2", HF_CLASSES["gpt2"], {}, hf.n_layer, dims), cfg
    if kind == "mamba":
        _need(folder, hf.hidden_act == "silu", f"hidden_act={hf.hidden_act!r} (micro-arch's Mamba gates with silu)")
        _need(folder, hf.intermediate_size == hf.expand * hf.hidden_size, "intermediate_size != expand * hidden_size")
        mamba = _call("mamba", d_state=hf.state_size, d_conv=hf.conv_kernel, expand=hf.expand,
                      dt_rank=hf.time_step_rank, conv_bias=hf.use_conv_bias, bias=hf.use_bias)
        cfg = ModelConfig(d_model=hf.hidden_size, positions="none", layers=[LayerGroup("Norm->Mamba->+",
                          hf.num_hidden_layers)], defaults={"Norm": _call("rmsnorm", eps=hf.layer_norm_epsilon),
                                                            "Mamba": mamba}, **common)
        return Layout("mamba", HF_CLASSES["mamba"], {}, hf.num_hidden_layers), cfg
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    _need(folder, rope.get("rope_type", "default") in ("default", "linear"),
          f"rope_parameters rope_type={rope.get('rope_type')!r}: micro-arch's attention has plain RoPE and position "
          "interpolation ('linear', model.rope_scaling) only")
    _need(folder, hf.hidden_act == "silu", f"hidden_act={hf.hidden_act!r}: micro-arch's swiglu uses silu")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    attn, mlp = {}, {}
    if getattr(hf, "attention_bias", False):
        attn["bias"] = True
    if getattr(hf, "mlp_bias", False):
        mlp["bias"] = True
    if kind in ("qwen3", "qwen3_moe"):
        _need(folder, kind == "qwen3_moe" or not hf.use_sliding_window,
              "use_sliding_window=true (layer-dependent windows are not mapped)")
        _need(folder, hf.rms_norm_eps == QK_NORM_EPS, f"rms_norm_eps={hf.rms_norm_eps}: micro-arch's qk-norm "
              f"uses eps {QK_NORM_EPS}")
        attn["qk_norm"] = True
    n_layers = hf.num_hidden_layers
    roles = ["MoE" if kind == "mixtral" else "MLP"] * n_layers  # each layer's feed-forward role
    if kind in ("qwen2_moe", "qwen3_moe"):
        roles = ["MoE" if _sparse(hf, i) else "MLP" for i in range(n_layers)]
    if "MoE" in roles and kind in ("qwen2_moe", "qwen3_moe"):
        _need(folder, hf.norm_topk_prob == (hf.num_experts_per_tok > 1), f"norm_topk_prob={hf.norm_topk_prob} with "
              f"top_k={hf.num_experts_per_tok}: micro-arch's moe renormalises the gates exactly when top_k > 1")
    if "MoE" in roles and kind == "qwen2_moe":
        _need(folder, hf.shared_expert_intermediate_size == 0, "a sigmoid-gated shared expert (micro-arch's "
              "shared experts are ungated)")
    if kind == "qwen2_moe":
        _need(folder, not hf.use_sliding_window and not hf.qkv_bias, "a sliding window or q/k/v biases without an "
              "output bias")
    if kind in ("mistral", "mixtral", "qwen3_moe") and hf.sliding_window is not None:
        attn["window"] = hf.sliding_window  # Qwen3-MoE: one window for every layer, and None unless use_sliding_window
    ffns = {"MLP": _call("swiglu", **mlp)}
    dims = {"n_heads": hf.num_attention_heads, "n_kv_heads": hf.num_key_value_heads, "head_dim": head_dim}
    if kind in ("qwen2_moe", "qwen3_moe"):
        ffns["MoE"] = _call("moe", n_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                            d_ff=hf.moe_intermediate_size, aux_loss_coef=hf.router_aux_loss_coef)
        dims["n_experts"] = hf.num_experts
        dims["dense_layers"] = tuple(i for i, role in enumerate(roles) if role == "MLP")
    if kind == "mixtral":
        _need(folder, hf.num_experts_per_tok >= 2, "num_experts_per_tok=1: Mixtral renormalises the one gate to 1, "
              "micro-arch's moe keeps the raw probability (Switch)")
        ffns["MoE"] = _call("moe", n_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                            aux_loss_coef=hf.router_aux_loss_coef)
        dims["n_experts"] = hf.num_local_experts
    layers = [LayerGroup(PRE_NORM.replace("MLP", role), len(list(run))) for role, run in groupby(roles)]
    cfg = ModelConfig(d_model=hf.hidden_size, n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
                      head_dim=head_dim, d_ff=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
                      positions="rope", rope_theta=float(rope.get("rope_theta", 10000.0)),
                      rope_scaling=float(rope.get("factor", 1.0)) if rope.get("rope_type") == "linear" else 1.0,
                      layers=layers, defaults={"Norm": _call("rmsnorm", eps=hf.rms_norm_eps),
                                               "Attn": _call("attention", **attn),
                                               **{role: ffns[role] for role in dict.fromkeys(roles)}}, **common)
    return Layout(kind, HF_CLASSES[kind], {}, n_layers, dims), cfg


def _sparse(hf, i: int) -> bool:
    """Whether a Qwen-MoE config gives layer i experts: transformers' own rule, mlp_only_layers and the step."""
    return i not in hf.mlp_only_layers and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0


def read_hf_config(folder):
    """(the transformers config, the layout, the micro-arch ModelConfig) of a local folder: config.json only,
    so an architecture micro-arch cannot import is refused before any weights are read."""
    from micro_arch.offline import offline

    offline()
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise MicroArchError(f"{folder}: not a readable Hugging Face model folder ({str(err).splitlines()[0]})") from None
    return (hf_config, *config_from_hf(folder, hf_config))


def read_hf_folder(folder) -> tuple[ModelConfig, dict, dict]:
    """(micro-arch model config, state dict in micro-arch names, provenance) from a local transformers folder."""
    from transformers import AutoModelForCausalLM

    from micro_arch.hf.weights import from_hf

    folder = Path(folder)
    hf_config, layout, cfg = read_hf_config(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    state = from_hf(layout, hf_model.state_dict())
    provenance = {"type": "huggingface", "path": str(folder.resolve()), "hf_class": type(hf_model).__name__,
                  "model_type": hf_config.model_type}
    return cfg, state, provenance


def load_hf_model(folder):
    """A micro-arch Model (eval mode, float32) with the weights of a local Hugging Face folder."""
    from micro_arch.model.model import Model

    cfg, state, _ = read_hf_folder(folder)
    model = Model(cfg)
    model.load_state_dict(state)
    return model.eval()
