"""Does an experiment's model match the model its starting weights come from? The first difference, in words.

Compared is what the weights mean, not how the config is written: a few global settings, then module by
module (same structure, same block types, same parameter shapes, same forward settings such as a window,
an eps or a router). Allowed to differ, because a later stage may change them: max_seq_len (a learned
position table is extended), vocab_size growth (new rows for new special tokens), dropout, init_std, and
block arguments that only shape training (TRAINING_ONLY).
"""

from __future__ import annotations

from torch import nn

from micro_arch.config import ModelConfig
from micro_arch.model.model import Chain

# Block attributes that change training or initialisation, never what a forward pass computes.
TRAINING_ONLY = {"training", "dropout", "p", "inplace", "scan", "chunk_size", "dt_min", "dt_max", "aux_loss_coef",
                 "z_loss_coef", "bias_update_rate", "n_layers", "spec"}
STRUCTURE = {"plan"}  # a chain's order of blocks and adds: compared first, in words (layer_difference)
SCALARS = (int, float, bool, str, tuple, type(None))
GROWABLE = {"embed.weight", "head.weight"}  # rows = vocabulary


def _global_settings(cfg: ModelConfig) -> dict:
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    out = {"d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads or cfg.n_heads,
           "head_dim": head_dim, "positions": cfg.positions, "tie_embeddings": cfg.tie_embeddings,
           "layers": f"{sum(g.repeat for g in cfg.layers)} layers"}
    if cfg.positions == "rope":
        out["rope_theta"] = cfg.rope_theta
    return out


def where(name: str, module: nn.Module | None = None) -> str:
    """'layers.2.branches.0.blocks.1' -> 'layer 2, branch 0, block 1 (Attention)'."""
    parts = name.split(".")
    words = []
    i = 0
    while i < len(parts):
        key = parts[i]
        if key in ("layers", "branches", "blocks") and i + 1 < len(parts) and parts[i + 1].isdigit():
            words.append(f"{key[:-1] if key != 'branches' else 'branch'} {parts[i + 1]}")
            i += 2
        else:
            words.append(key)
            i += 1
    text = ", ".join(words) or "the model"
    return f"{text} ({type(module).__name__})" if module is not None else text


def settings(module: nn.Module) -> dict:
    if type(module).__module__.startswith("torch."):  # Linear, Embedding, Conv1d: their shapes say it all
        return {}
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in TRAINING_ONLY | STRUCTURE and isinstance(v, SCALARS)}


def setting_difference(a: nn.Module, b: nn.Module) -> tuple[str, object, object] | None:
    """The first setting (by name) on which two blocks differ: (name, a's value, b's value), or None."""
    sa, sb = settings(a), settings(b)
    for key in sorted(sa.keys() | sb.keys()):
        if sa.get(key) != sb.get(key):
            return key, sa.get(key), sb.get(key)
    return None


def block_difference(a: nn.Module, b: nn.Module, other_class: str, other_setting: str, **names) -> str | None:
    """None when two blocks compute alike; else one line: `other_class` worded with {a} and {b} (their class
    names) when their classes differ, or `other_setting` with {key}, {a} and {b} (the values' reprs) for the
    first setting that differs. `names` fill the wording's other fields."""
    if type(a) is not type(b):
        return other_class.format(a=type(a).__name__, b=type(b).__name__, **names)
    differs = setting_difference(a, b)
    if differs is None:
        return None
    key, first, second = differs
    return other_setting.format(key=key, a=repr(first), b=repr(second), **names)


def _branches(n: int) -> str:
    return "1 branch" if n == 1 else f"{n} parallel branches"


def layer_difference(source: nn.Module, target: nn.Module) -> str | None:
    """The first layer whose shape differs, in the words of the block strings: its number of parallel branches,
    or a branch's (or the final norm's) chain of blocks and adds; None when every layer has the same shape."""
    for i, (a, b) in enumerate(zip(source.layers, target.layers)):
        if len(a.branches) != len(b.branches):
            return f"the source's layer {i} has {_branches(len(a.branches))}, this one {len(b.branches)}"
        for j, (ca, cb) in enumerate(zip(a.branches, b.branches)):
            if ca.plan != cb.plan:
                place = f"layer {i}" + (f", branch {j}" if len(a.branches) > 1 else "")
                return f"{place} is {ca.spec!r} in the source, {cb.spec!r} here"
    a, b = getattr(source, "final_norm", None), getattr(target, "final_norm", None)
    if isinstance(a, Chain) and isinstance(b, Chain) and a.plan != b.plan:
        return f"the final norm is {a.spec!r} in the source, {b.spec!r} here"
    return None


def first_difference(source_cfg: ModelConfig, source: nn.Module, target_cfg: ModelConfig,
                     target: nn.Module) -> str | None:
    """None when `target` can take `source`'s weights; else one line naming the first difference.
    `source` may live on the meta device (only structure and shapes are read)."""
    src, tgt = _global_settings(source_cfg), _global_settings(target_cfg)
    for key in src:
        if src[key] != tgt.get(key):
            return f"model.{key} is {src[key]!r} in the source, {tgt.get(key)!r} here"
    src_vocab, tgt_vocab = source_cfg.vocab_size, target_cfg.vocab_size
    if tgt_vocab is not None and src_vocab is not None and tgt_vocab < src_vocab:
        return (f"model.vocab_size is {src_vocab} in the source, {tgt_vocab} here (it may grow for new tokens, "
                "never shrink)")
    shape = layer_difference(source, target)
    if shape:
        return shape
    src_modules, tgt_modules = dict(source.named_modules()), dict(target.named_modules())
    for name, module in tgt_modules.items():
        if name not in src_modules:
            return f"{where(name, module)} is here but not in the source"
        differs = block_difference(src_modules[name], module, "{place} is {a} in the source, {b} here",
                                   "{block}: {key} is {a} in the source, {b} here", place=where(name),
                                   block=where(name, module))
        if differs:
            return differs
    for name, module in src_modules.items():
        if name not in tgt_modules:
            return f"{where(name, module)} is in the source but not here"
    src_sd, tgt_sd = source.state_dict(), target.state_dict()
    for key, value in tgt_sd.items():
        if key not in src_sd:
            return f"parameter {key} is here but not in the source"
        a, b = tuple(src_sd[key].shape), tuple(value.shape)
        if a == b or key == "pos_embed.weight" or (key in GROWABLE and a[1:] == b[1:] and b[0] >= a[0]):
            continue
        return f"parameter {key} has shape {a} in the source, {b} here"
    for key in src_sd:
        if key not in tgt_sd:
            return f"parameter {key} is in the source but not here"
    return None
