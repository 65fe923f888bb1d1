"""Which micro-arch models have a Hugging Face twin, and the one-line reason when one has not.

`layout_of(model)` reads the built model (the blocks and their settings, not how the config spells them)
and returns a Layout: the transformers class and the config arguments that make it compute the same
function. Supported (every layer the same single pre-norm chain, a final norm of the same kind; the Qwen MoE layouts
also take dense SwiGLU layers among the MoE layers):

    rmsnorm, attention, swiglu, rope        -> LlamaForCausalLM   (GQA/MQA, head_dim, theta, biases, tying)
      + attention(qk_norm=true)             -> Qwen3ForCausalLM   (norm eps must be 1e-6, the qk-norm's)
      + attention(window=W) in every layer  -> MistralForCausalLM
    rmsnorm, attention, moe, rope           -> MixtralForCausalLM (softmax router, top_k >= 2, no extras)
      + moe(top_k=1) (Switch: the raw gate)  -> Qwen2MoeForCausalLM (norm_topk_prob off, no shared expert)
      + attention(qk_norm=true), any top_k  -> Qwen3MoeForCausalLM (norm eps 1e-6; norm_topk_prob iff top_k > 1;
                                               attention biases and one window for every layer allowed)
      + dense swiglu layers among the MoE -> Qwen3-MoE / Qwen2-MoE with mlp_only_layers (one dense width, no biases)
    layernorm, attention, gelu_mlp, learned -> GPT2LMHeadModel    (MHA; missing biases export as zeros)
    rmsnorm, mamba (Norm->Mamba->+)         -> MambaForCausalLM

Anything else raises MicroArchError("cannot export: <what differs>; nearest supported layout: ...").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from micro_arch.errors import MicroArchError
from micro_arch.hf.match import block_difference
from micro_arch.model.registry import list_blocks

QK_NORM_EPS = 1e-6  # blocks/attention.py normalises q and k with this eps
PRE_NORM = "Norm->Attn->+->Norm->MLP->+"


@dataclass
class Layout:
    family: str  # llama, qwen3, mistral, mixtral, qwen2_moe, qwen3_moe, gpt2, mamba
    hf_class: str  # e.g. LlamaForCausalLM
    config: dict  # keyword arguments of the transformers config class
    n_layers: int
    dims: dict = field(default_factory=dict)  # what the weight maps need: n_heads, n_kv_heads, head_dim,
    # n_experts, dense_layers (the MoE families' layers with a dense MLP: Qwen-MoE's mlp_only_layers)

    @property
    def config_class(self) -> str:
        return {"gpt2": "GPT2Config"}.get(self.family, self.hf_class.replace("ForCausalLM", "Config"))


HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
              "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "gpt2": "GPT2LMHeadModel", "mamba": "MambaForCausalLM"}
NEAREST = {
    "llama": f"Llama (LlamaForCausalLM): every layer {PRE_NORM} with rmsnorm, attention, swiglu and RoPE",
    "gpt2": f"GPT-2 (GPT2LMHeadModel): every layer {PRE_NORM} with layernorm, attention, gelu_mlp and learned "
            "positions",
    "mixtral": f"Mixtral (MixtralForCausalLM): every layer {PRE_NORM.replace('MLP', 'MoE')} with rmsnorm, RoPE "
               "and a softmax top-k (k >= 2) router",
    "qwen2_moe": "Qwen2-MoE (Qwen2MoeForCausalLM): the Mixtral layout with top_k=1 and no attention biases or "
                 "sliding window",
    "mamba": "Mamba-1 (MambaForCausalLM): every layer Norm->Mamba->+ with rmsnorm and no MLP",
    "mistral": "Mistral (MistralForCausalLM): the Llama layout with one sliding window in every layer",
    "qwen3": "Qwen3 (Qwen3ForCausalLM): the Llama layout with attention(qk_norm=true) and norm eps 1e-6",
    "qwen3_moe": "Qwen3-MoE (Qwen3MoeForCausalLM): the Mixtral layout with attention(qk_norm=true), norm eps 1e-6 "
                 "and any top_k; dense SwiGLU layers of one width allowed among the MoE layers",
}


def refuse(what: str, nearest: str) -> MicroArchError:
    return MicroArchError(f"cannot export: {what}; nearest supported layout: {NEAREST[nearest]}")


def _block_names() -> dict[type, str]:
    return {entry.cls: entry.name for entry in list_blocks()}


def _kind(block, names) -> str:
    name = names.get(type(block))
    return {"rmsnorm": "rms", "rmsnorm_triton": "rms", "layernorm": "ln", "attention": "attn",
            "swiglu": "swiglu", "gelu_mlp": "gelu", "moe": "moe", "mamba": "mamba"}.get(name, "other")


def _steps(chain) -> list:
    return ["+" if i < 0 else chain.blocks[i] for i in chain.plan]


def _shape_of(chain, names) -> str:
    return "->".join("+" if s == "+" else names.get(type(s), type(s).__name__) for s in _steps(chain))


def _check_chain(i: int, chain, names) -> tuple:
    """The (norm1, mixer, norm2, ffn) of a supported layer, (norm, mamba) for Mamba, or a refusal."""
    steps = _steps(chain)
    kinds = ["+" if s == "+" else _kind(s, names) for s in steps]
    spec = _shape_of(chain, names)
    for step, kind in zip(steps, kinds):
        if kind == "other":
            source = type(step).__module__
            nearest = "mamba" if "mamba" in kinds else "llama"
            raise refuse(f"layer {i} ({spec}) has block {type(step).__name__} (from {source}), which no "
                         "transformers class has", nearest)
    norms = ("rms", "ln")
    if "mamba" in kinds:
        if len(kinds) == 3 and kinds[0] in norms and kinds[1:] == ["mamba", "+"]:
            return steps[0], steps[1]
        raise refuse(f"layer {i} is {spec}, a Mamba layer with more in it (a hybrid or an MLP)", "mamba")
    if len(kinds) == 6 and kinds[0] in norms and kinds[1] == "attn" and kinds[2] == "+" and kinds[3] in norms \
            and kinds[4] in ("swiglu", "gelu", "moe") and kinds[5] == "+":
        return steps[0], steps[1], steps[3], steps[4]
    if kinds and kinds[-1] in norms:
        what = "post-norm (a norm after the last residual add)"
    elif any(k in norms and nxt == "+" for k, nxt in zip(kinds, kinds[1:])):
        what = "sandwich norm (a norm just before a residual add)"
    else:
        what = "not the pre-norm Norm->Attn->+->Norm->MLP->+ chain"
    raise refuse(f"layer {i} is {spec}: {what}", "llama")


def _describe_difference(i, first, other, ffn_from: int = 0) -> str:
    """How layer i's blocks differ from `first`: layer 0's, except the FFN, which is layer `ffn_from`'s."""
    for position, (a, b) in enumerate(zip(first, other)):
        j = ffn_from if position == 3 else 0
        differs = block_difference(a, b, "layer {i} has {b} where layer {j} has {a} (a hybrid)",
                                   "layer {i}'s {kind} has {key}={b} but layer {j}'s has {a}", i=i, j=j,
                                   kind=type(b).__name__)
        if differs:
            return differs
        shapes_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
        shapes_b = {k: tuple(v.shape) for k, v in b.state_dict().items()}
        if shapes_a != shapes_b:
            return f"layer {i}'s {type(b).__name__} has other parameter shapes than layer {j}'s"
    return ""


def _ffn_groups(parts, names) -> dict[str, int]:
    """{'swiglu': first dense layer, 'moe': first MoE layer} when dense SwiGLU and MoE layers mix, else {}."""
    if any(len(p) != 4 for p in parts):
        return {}
    firsts = {}
    for i, p in enumerate(parts):
        firsts.setdefault(_kind(p[3], names), i)
    return firsts if set(firsts) == {"swiglu", "moe"} else {}


def layout_of(model) -> Layout:
    """The Hugging Face layout that computes what `model` does, or a one-line MicroArchError saying why none."""
    cfg = model.cfg
    names = _block_names()
    parts = []
    for i, layer in enumerate(model.layers):
        if len(layer.branches) > 1:
            specs = " | ".join(_shape_of(b, names) for b in layer.branches)
            raise refuse(f"layer {i} has {len(layer.branches)} parallel branches ({specs}); no transformers "
                         "causal-LM class sums parallel residual branches", "llama")
        parts.append(_check_chain(i, layer.branches[0], names))
    first = parts[0]
    mixed = _ffn_groups(parts, names)
    dense_layers = [i for i, p in enumerate(parts) if mixed and _kind(p[3], names) == "swiglu"]
    widths = {}
    for i in dense_layers:
        widths.setdefault(parts[i][3].hidden, i)
    if len(widths) > 1:
        shown = ", ".join(f"{w} in layer {i}" for w, i in widths.items())
        raise refuse(f"dense SwiGLU layers of different widths ({shown}); Qwen-MoE configs have one "
                     "intermediate_size for every dense layer", "qwen3_moe")
    for i, blocks in enumerate(parts[1:], start=1):
        j = mixed.get(_kind(blocks[3], names), 0) if mixed else 0
        reference = (*first[:3], parts[j][3]) if mixed else first
        if len(blocks) != len(first) or _describe_difference(i, reference, blocks, j):
            what = _describe_difference(i, reference, blocks, j) if len(blocks) == len(first) else \
                f"layer {i} and layer 0 are different kinds of layer (a hybrid)"
            windows = [getattr(b, "window", "-") for b in (first[1], blocks[1])] if len(blocks) == 4 else None
            if windows and windows[0] != windows[1] and "window" in what:
                raise refuse(f"{what}: sliding windows in some layers only", "mistral")
            raise refuse(what, "mamba" if len(first) == 2 else "qwen3_moe" if mixed else "llama")
    norm = first[0]
    if model.final_norm is None or len(model.final_norm.plan) != 1 or \
            type(model.final_norm.blocks[0]) is not type(norm):
        shown = "null" if model.final_norm is None else model.final_norm.spec
        raise refuse(f"model.final_norm is {shown}, the layers' norm is {type(norm).__name__}; transformers "
                     "classes end with one norm of the layers' kind", "mamba" if len(first) == 2 else "llama")
    eps = {type(n).__name__ + f" eps={n.eps}" for blocks in parts for n in blocks[::2] if hasattr(n, "eps")}
    eps.add(type(model.final_norm.blocks[0]).__name__ + f" eps={model.final_norm.blocks[0].eps}")
    if len(eps) > 1:
        raise refuse(f"the norms differ ({', '.join(sorted(eps))}); transformers classes use one norm eps",
                     "mamba" if len(first) == 2 else "llama")
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None,
              "eos_token_id": None, "pad_token_id": None}
    if len(first) == 2:
        return _mamba(model, first, common)
    if mixed:  # the MoE layers' blocks, and the dense MLP the other layers share
        return _transformer(model, (*first[:3], parts[mixed["moe"]][3]), common, parts[mixed["swiglu"]][3],
                            dense_layers)
    return _transformer(model, first, common)


def _mamba(model, first, common) -> Layout:
    norm, mamba = first
    names = _block_names()
    if _kind(norm, names) != "rms":
        raise refuse(f"the Mamba layers use {type(norm).__name__}", "mamba")
    if model.cfg.positions == "learned":
        raise refuse("positions=learned adds a position table that MambaForCausalLM has not", "mamba")
    config = {**common, "hidden_size": model.cfg.d_model, "state_size": mamba.d_state,
              "num_hidden_layers": len(model.layers), "layer_norm_epsilon": norm.eps,
              "expand": mamba.d_inner // model.cfg.d_model, "conv_kernel": mamba.d_conv,
              "use_bias": mamba.in_proj.bias is not None, "use_conv_bias": mamba.conv1d.bias is not None,
              "hidden_act": "silu", "time_step_rank": mamba.dt_rank, "residual_in_fp32": True}
    return Layout("mamba", HF_CLASSES["mamba"], config, len(model.layers))


def _transformer(model, first, common, dense=None, dense_layers=()) -> Layout:
    cfg, names = model.cfg, _block_names()
    norm, attn, _, ffn = first
    norm_kind, ffn_kind = _kind(norm, names), _kind(ffn, names)
    bias = attn.qkv_proj.bias is not None
    dims = {"n_heads": attn.n_heads, "n_kv_heads": attn.n_kv_heads, "head_dim": attn.head_dim}
    if norm_kind == "ln":
        if cfg.positions != "learned" or ffn_kind != "gelu":
            got = f"LayerNorm with positions={cfg.positions} and {type(ffn).__name__}"
            nearest = "gpt2" if cfg.positions != "rope" else "mixtral" if ffn_kind == "moe" else "llama"
            fix = "; set model.defaults.Norm: rmsnorm" if nearest != "gpt2" and ffn_kind != "gelu" else ""
            raise refuse(got + fix, nearest)
        if attn.n_kv_heads != attn.n_heads or attn.head_dim * attn.n_heads != cfg.d_model:
            raise refuse(f"attention with {attn.n_kv_heads} K/V heads for {attn.n_heads} query heads of width "
                         f"{attn.head_dim}: GPT-2 has plain multi-head attention of width d_model/n_heads", "gpt2")
        if attn.window is not None or attn.qk_norm:
            raise refuse("GPT-2 attention has no sliding window and no QK-norm", "gpt2")
        config = {**common, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": len(model.layers),
                  "n_head": attn.n_heads, "n_inner": ffn.up_proj.out_features, "activation_function": "gelu",
                  "layer_norm_epsilon": norm.eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return Layout("gpt2", HF_CLASSES["gpt2"], config, len(model.layers), dims)
    if cfg.positions != "rope":
        raise refuse(f"RMSNorm with positions={cfg.positions}: the Llama family uses RoPE", "llama")
    if ffn_kind == "gelu":
        raise refuse("RMSNorm with gelu_mlp: the Llama family uses SwiGLU (model.defaults.MLP: swiglu)", "llama")
    config = {**common, "hidden_size": cfg.d_model, "num_hidden_layers": len(model.layers),
              "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.n_kv_heads,
              "head_dim": attn.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
              "rms_norm_eps": norm.eps, "rope_parameters": _rope(cfg),
              "attention_dropout": 0.0}
    if ffn_kind == "moe":
        return _moe(ffn, attn, bias, norm.eps, config, len(model.layers), dims, dense, dense_layers)
    mlp_bias = ffn.in_proj.bias is not None
    config["intermediate_size"] = ffn.hidden
    if attn.qk_norm:
        if attn.window is not None or mlp_bias or norm.eps != QK_NORM_EPS:
            what = ("a sliding window" if attn.window is not None else "biases in the MLP" if mlp_bias
                    else f"norm eps {norm.eps} (Qwen3 uses one eps for every norm, and the qk-norm's is "
                         f"{QK_NORM_EPS}; set model.defaults.Norm: rmsnorm(eps=1e-6))")
            raise refuse(f"attention(qk_norm=true) with {what}", "qwen3")
        return Layout("qwen3", HF_CLASSES["qwen3"], {**config, "attention_bias": bias, "use_sliding_window": False},
                      len(model.layers), dims)
    if attn.window is not None:
        if bias or mlp_bias:
            raise refuse("a sliding window with biases: Mistral has no biases", "mistral")
        return Layout("mistral", HF_CLASSES["mistral"], {**config, "sliding_window": attn.window},
                      len(model.layers), dims)
    return Layout("llama", HF_CLASSES["llama"], {**config, "attention_bias": bias, "mlp_bias": mlp_bias},
                  len(model.layers), dims)


def _rope(cfg) -> dict:
    """model.rope_scaling (position interpolation: positions divided by it) is transformers' 'linear' RoPE."""
    if cfg.rope_scaling == 1.0:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "linear", "factor": cfg.rope_scaling, "rope_theta": cfg.rope_theta}


def _moe(moe, attn, bias, eps, config, n_layers, dims, dense=None, dense_layers=()) -> Layout:
    """Mixtral, Qwen2-MoE (top_k=1) or, with QK-norm, Qwen3-MoE: all three route alike (softmax, top-k, no
    drops, SwiGLU experts), so one list of refusals, named after the layout the attention points to. `dense`:
    the SwiGLU of the `dense_layers` among the MoE layers (the Qwen families' mlp_only_layers)."""
    family = "qwen3_moe" if attn.qk_norm else "mixtral"
    name = "Qwen3-MoE" if attn.qk_norm else "Mixtral"
    if dense_layers and not attn.qk_norm and moe.top_k > 1:
        raise refuse(f"dense SwiGLU layers {dense_layers} among MoE layers with top_k={moe.top_k}: Mixtral has none "
                     "(Qwen3-MoE, with attention(qk_norm=true) and norm eps 1e-6, and Qwen2-MoE, with top_k=1, list "
                     "them in mlp_only_layers)", "qwen3_moe")
    problems = []
    if moe.expert != "swiglu":
        problems.append(f"expert={moe.expert!r} ({name} experts are SwiGLU)")
    if moe.router_kind != "softmax":
        problems.append(f"router={moe.router_kind!r} ({name}'s router is a softmax)")
    if moe.balance == "bias":
        problems.append(f"balance='bias' adds a learned per-expert bias to expert selection, which {name} has not")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor={moe.capacity_factor} drops tokens over capacity; {name} never drops")
    if moe.shared is not None:
        problems.append("shared experts (Qwen3-MoE has none)" if attn.qk_norm else
                        "shared experts (Mixtral has none; Qwen2-MoE's are sigmoid-gated, not mapped)")
    if attn.qk_norm and eps != QK_NORM_EPS:
        problems.append(f"norm eps {eps} (Qwen3-MoE uses one eps for every norm, and the qk-norm's is {QK_NORM_EPS}; "
                        "set model.defaults.Norm: rmsnorm(eps=1e-6))")
    if bias and not attn.qk_norm:
        problems.append("attention with biases")
    if dense is not None and dense.in_proj.bias is not None:
        problems.append(f"biases in the dense SwiGLU layers {dense_layers} (Qwen-MoE's dense MLPs have none)")
    if problems:
        raise refuse("MoE " + "; ".join(problems), family)
    dims = {**dims, "n_experts": moe.n_experts, "dense_layers": tuple(dense_layers)}
    sparse = {"intermediate_size": moe.hidden if dense is None else dense.hidden, "moe_intermediate_size": moe.hidden,
              "num_experts": moe.n_experts, "decoder_sparse_step": 1, "mlp_only_layers": list(dense_layers),
              "router_aux_loss_coef": moe.aux_loss_coef}
    if attn.qk_norm:  # the top-k gates renormalised exactly when micro-arch's moe renormalises them
        config = {**config, **sparse, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.top_k > 1,
                  "attention_bias": bias, "use_sliding_window": attn.window is not None,
                  "sliding_window": attn.window}
        return Layout("qwen3_moe", HF_CLASSES["qwen3_moe"], config, n_layers, dims)
    return _mixtral(moe, attn, config, n_layers, dims, sparse)


def _mixtral(moe, attn, config, n_layers, dims, sparse) -> Layout:
    if moe.top_k == 1:  # Switch: the raw probability is the gate, which Mixtral would renormalise to 1
        if attn.window is not None:
            raise refuse("MoE with top_k=1 and a sliding window", "qwen2_moe")
        config = {**config, **sparse, "shared_expert_intermediate_size": 0, "num_experts_per_tok": 1,
                  "norm_topk_prob": False, "qkv_bias": False, "use_sliding_window": False}
        return Layout("qwen2_moe", HF_CLASSES["qwen2_moe"], config, n_layers, dims)
    config = {**config, "intermediate_size": moe.hidden, "num_local_experts": moe.n_experts,
              "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
              "router_jitter_noise": 0.0, "sliding_window": attn.window}
    return Layout("mixtral", HF_CLASSES["mixtral"], config, n_layers, dims)
