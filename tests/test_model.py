"""Model assembly: residual semantics of chains and parallel branches, norms, heads, positions, init, configs."""

import math
import textwrap
from pathlib import Path

import pytest
import torch

from micro_arch.config import LayerGroup, ModelConfig, load_config
from micro_arch.errors import MicroArchError
from micro_arch.experiment import build_model, load_experiment
from micro_arch.model.model import Chain, Layer, Model
from micro_arch.model.registry import Dims, get_entry
from micro_arch.model.spec import resolve_chain
from micro_arch.model.state import BlockState

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"Norm": "rmsnorm", "Attn": "attention", "MLP": "swiglu"}
DIMS = Dims(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, max_seq_len=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def chain(spec, seed=0):
    torch.manual_seed(seed)
    c = Chain(resolve_chain(spec, DEFAULTS), DIMS)
    with torch.no_grad():
        for p in c.parameters():
            p.normal_(0.0, 0.2)
    return c.eval()


def rand_x(T=10, seed=1):
    return torch.randn(2, T, 32, generator=torch.Generator().manual_seed(seed))


def state_for(x):
    return BlockState(positions=torch.arange(x.shape[1]))


def tiny_cfg(**kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=32,
                layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 2)])
    return ModelConfig(**{**base, **kw})


# --- residual semantics -----------------------------------------------------------------------------


def test_chain_with_adds_follows_the_design():
    c = chain("Norm->Attn->+->Norm->MLP->+")
    norm1, attn, norm2, mlp = c.blocks
    x = rand_x()
    with torch.no_grad():
        s = state_for(x)
        h = attn(norm1(x, s), s)
        x1 = x + h
        expected = x1 + mlp(norm2(x1, s), s)
        torch.testing.assert_close(c(x, state_for(x)), expected)


def test_blocks_after_the_last_add_transform_the_stream():
    c = chain("Attn->+->Norm->MLP->+->Norm")  # DESIGN's post-LN
    attn, norm1, mlp, norm2 = c.blocks
    x = rand_x()
    with torch.no_grad():
        s = state_for(x)
        x1 = x + attn(x, s)  # '+': x = x + h; h = x
        x2 = x1 + mlp(norm1(x1, s), s)  # a norm between two '+' reads h and stays inside the branch
        expected = norm2(x2, s)  # only blocks after the last '+' transform the stream itself
        torch.testing.assert_close(c(x, state_for(x)), expected)


def test_sandwich_norm_chain():
    c = chain("Norm->Attn->Norm->+->Norm->MLP->Norm->+")
    n1, attn, n2, n3, mlp, n4 = c.blocks
    x = rand_x()
    with torch.no_grad():
        s = state_for(x)
        x1 = x + n2(attn(n1(x, s), s), s)
        expected = x1 + n4(mlp(n3(x1, s), s), s)
        torch.testing.assert_close(c(x, state_for(x)), expected)


def test_chain_without_add_is_plain_composition():
    c = chain("Norm->MLP")
    x = rand_x()
    with torch.no_grad():
        torch.testing.assert_close(c(x, None), c.blocks[1](c.blocks[0](x, None), None))


@pytest.mark.parametrize("specs", [
    ["Norm->Attn->+", "Norm->MLP->+"],  # GPT-J
    ["Norm->Attn->+->Norm->MLP->+", "Norm->MLP->+", "Norm->Attn(window=2)->+"],
])
def test_parallel_branches_sum_their_residual_updates(specs):
    branches = [chain(s, seed=i) for i, s in enumerate(specs)]
    layer = Layer(branches)
    x = rand_x()
    with torch.no_grad():
        expected = x + sum(b(x, state_for(x)) - x for b in branches)
        torch.testing.assert_close(layer(x, state_for(x)), expected, atol=1e-5, rtol=1e-5)
        # and it is not simply the branches one after the other
        sequential = branches[1](branches[0](x, state_for(x)), state_for(x))
        assert not torch.allclose(layer(x, state_for(x)), sequential, atol=1e-3)


def test_model_builds_parallel_layers_from_a_list():
    model = Model(tiny_cfg(layers=[LayerGroup(["Norm->Attn->+", "Norm->MLP->+"], 3)]))
    assert len(model.layers) == 3
    assert [b.spec for b in model.layers[0].branches] == ["rmsnorm->attention->+", "rmsnorm->swiglu->+"]


def layer_outputs(model, idx):
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o)) for layer in model.layers]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return outs


def test_post_norm_spec_normalises_the_stream():
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    post = Model(tiny_cfg(layers=[LayerGroup("Attn->+->Norm->MLP->+->Norm", 3)], final_norm=None))
    assert post.final_norm is None
    outs = layer_outputs(post, idx)
    for i, out in enumerate(outs):
        rms = out.pow(2).mean(-1).sqrt()
        # layer 0 normalises the small embeddings, where eps=1e-5 still counts; later layers see RMS ~1
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=0.05 if i == 0 else 1e-3, rtol=0)
    torch.manual_seed(0)
    pre = Model(tiny_cfg(layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 3)]))
    for out in layer_outputs(pre, idx):  # pre-norm leaves the stream at the embedding scale
        assert out.pow(2).mean(-1).sqrt().max() < 0.5


# --- heads, positions, sizes ------------------------------------------------------------------------


def expected_params(d=32, H=4, KV=2, V=50, L=2, max_seq=32):
    D = d // H
    hidden = 32 * math.ceil(int(8 * d / 3) / 32)
    per_layer = 2 * d + d * (H + 2 * KV) * D + H * D * d + d * 2 * hidden + hidden * d
    return L * per_layer + d  # + the final norm


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads(tie):
    model = Model(tiny_cfg(tie_embeddings=tie))
    assert (model.head.weight is model.embed.weight) == tie
    body, emb = expected_params(), 50 * 32
    assert model.num_params() == body + emb * (1 if tie else 2)
    assert model.num_params(non_embedding=True) == body
    with torch.no_grad():
        model.embed.weight[3].fill_(7.0)
    assert bool((model.head.weight[3] == 7.0).all()) == tie


def test_learned_positions_are_added_to_the_embedding_and_not_counted_as_body():
    model = Model(tiny_cfg(positions="learned"))
    assert model.pos_embed is not None and model.pos_embed.weight.shape == (32, 32)
    assert all(not layer.branches[0].blocks[1].use_rope for layer in model.layers)
    assert model.num_params() == expected_params() + 50 * 32 + 32 * 32
    assert model.num_params(non_embedding=True) == expected_params()
    idx = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(idx)
        state = BlockState(positions=torch.tensor([5]), cache={})
        model(idx, state=state)  # offset 5: rows 5..10 of the position table
    torch.testing.assert_close(seen[0], model.embed(idx) + model.pos_embed.weight[:6])
    torch.testing.assert_close(seen[1], model.embed(idx) + model.pos_embed.weight[5:11])


def test_rope_model_has_no_position_table():
    model = Model(tiny_cfg(positions="rope"))
    assert model.pos_embed is None
    attn = model.layers[0].branches[0].blocks[1]
    assert attn.use_rope and attn.rope.shape == (32, 4, 2)  # (max_seq_len, head_dim / 2, cos|sin)
    idx = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(idx)
    torch.testing.assert_close(seen[0], model.embed(idx))


def test_positions_none_model_has_neither():
    model = Model(tiny_cfg(positions="none"))
    assert model.pos_embed is None
    assert not model.layers[0].branches[0].blocks[1].use_rope


def test_sequence_longer_than_max_seq_len_is_an_error():
    model = Model(tiny_cfg(max_seq_len=16))
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))
        with pytest.raises(MicroArchError, match="max_seq_len=16"):
            model(torch.zeros(1, 17, dtype=torch.long))
        with pytest.raises(MicroArchError, match="17 tokens"):
            model(torch.zeros(1, 2, dtype=torch.long), state=BlockState(positions=torch.tensor([15])))


def test_missing_vocab_size_is_an_error():
    with pytest.raises(MicroArchError, match="vocab_size"):
        Model(tiny_cfg(vocab_size=None))


def test_bad_spec_error_names_the_layer_group():
    with pytest.raises(MicroArchError, match=r"model.layers\[1\].spec: bad block string: unknown block 'Atn'"):
        Model(tiny_cfg(layers=[LayerGroup("Norm->Attn->+", 1), LayerGroup("Norm->Atn->+", 1)]))


def test_a_constructor_refusal_points_at_the_argument_it_names():
    """The caret comes from the BlockArgumentError's `argument` field (no message parsing): the attention
    block names n_kv_heads, though head_dim also appears in the string and the message names n_heads."""
    from micro_arch.errors import BlockArgumentError

    spec = "Norm->Attn(head_dim=8, n_kv_heads=3)->+"
    with pytest.raises(BlockArgumentError) as info:
        Model(tiny_cfg(layers=[LayerGroup(spec, 1)]))
    err = info.value
    assert (err.block, err.argument, err.where) == ("attention", "n_kv_heads", "model.layers[0].spec")
    first, shown, caret = str(err).splitlines()
    assert first.startswith("model.layers[0].spec: bad block string: block 'attention'") and "multiple" in first
    assert caret.index("^") == shown.index("n_kv_heads")


def test_loss_is_cross_entropy_of_the_logits():
    model = Model(tiny_cfg())
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 50, (2, 8), generator=g), torch.randint(0, 50, (2, 8), generator=g)
    targets[0, :3] = -1  # ignored
    out = model(idx, targets)
    logp = out.logits.log_softmax(-1)
    keep = targets != -1
    expected = -logp[keep, targets[keep]].mean()
    torch.testing.assert_close(out.loss, expected)
    assert model(idx, last_only=True).logits.shape == (2, 1, 50)


# --- init ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers,n_adds", [
    ([LayerGroup("Norm->Attn->+->Norm->MLP->+", 3)], 6),
    ([LayerGroup("Norm->Attn->+", 2), LayerGroup(["Norm->Attn->+", "Norm->MLP->+"], 1)], 4),
])
def test_init_scales_residual_output_projections(layers, n_adds):
    torch.manual_seed(0)
    std = 0.05
    cfg = ModelConfig(d_model=256, n_heads=4, vocab_size=300, max_seq_len=16, init_std=std, layers=layers,
                      defaults={"Norm": "layernorm", "Attn": "attention(bias=true)", "MLP": "gelu_mlp"},
                      tie_embeddings=False)
    model = Model(cfg)
    seen = {"out_proj": 0, "other": 0}
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight"):
            assert p.std().item() == pytest.approx(std / math.sqrt(n_adds), rel=0.05), name
            seen["out_proj"] += 1
        elif p.dim() == 2:  # every other Linear and the embeddings
            assert p.std().item() == pytest.approx(std, rel=0.05), name
            assert abs(p.mean().item()) < std / 20, name
            seen["other"] += 1
        elif name.endswith("bias"):
            assert bool((p == 0).all()), name
        else:  # norm scales
            assert bool((p == 1).all()), name
    assert seen["out_proj"] >= 3 and seen["other"] >= 5


# --- configs ---------------------------------------------------------------------------------------------


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_merges_sections_and_the_child_wins(tmp_path):
    write(tmp_path / "base" / "config.yaml", """
        model:
          d_model: 48
          n_heads: 3
          defaults: {Norm: layernorm, MLP: gelu_mlp}
          layers: [{spec: 'Norm->Attn->+', repeat: 5}]
        train: {lr: 0.01, batch_size: 3}
    """)
    write(tmp_path / "child" / "config.yaml", """
        extends: ../base
        model:
          d_model: 96
          defaults: {MLP: swiglu}
        train: {batch_size: 7}
    """)
    cfg = load_config(tmp_path / "child")
    assert cfg.name == "child"
    assert (cfg.model.d_model, cfg.model.n_heads) == (96, 3)
    assert cfg.model.defaults["Norm"] == "layernorm" and cfg.model.defaults["MLP"] == "swiglu"
    assert cfg.model.layers == [LayerGroup("Norm->Attn->+", 5)]
    assert (cfg.train.lr, cfg.train.batch_size) == (0.01, 7)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a" / "config.yaml", "extends: ../b\n")
    write(tmp_path / "b" / "config.yaml", "extends: ../a\n")
    with pytest.raises(MicroArchError, match="cycle"):
        load_config(tmp_path / "a")


def test_partial_role_defaults_keep_the_other_roles(tmp_path):
    write(tmp_path / "e" / "config.yaml", "model:\n  defaults: {MLP: gelu_mlp}\n")
    cfg = load_config(tmp_path / "e", ["model.vocab_size=50"])
    assert cfg.model.defaults["MLP"] == "gelu_mlp" and cfg.model.defaults["Norm"] == "rmsnorm"
    model = Model(cfg.model)  # 'Norm' and 'Attn' still resolve
    assert model.layers[0].branches[0].spec == "rmsnorm->attention->+->rmsnorm->gelu_mlp->+"


def test_set_overrides(tmp_path):
    write(tmp_path / "e" / "config.yaml", """
        model:
          layers: [{spec: 'Norm->Attn->+', repeat: 1}, {spec: 'Norm->MLP->+', repeat: 1}]
    """)
    cfg = load_config(tmp_path / "e", ["model.d_model=64", "train.lr=1e-3", "model.layers.0.repeat=2",
                                       "model.layers.1.spec=Norm->MLP->+->Norm", "model.n_kv_heads=null",
                                       "train.betas=[0.8, 0.95]"])
    assert cfg.model.d_model == 64
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.model.layers == [LayerGroup("Norm->Attn->+", 2), LayerGroup("Norm->MLP->+->Norm", 1)]
    assert cfg.model.n_kv_heads is None and cfg.train.betas == [0.8, 0.95]


def test_set_layer_index_without_layers_in_the_file(tmp_path):
    write(tmp_path / "e" / "config.yaml", "model: {d_model: 64}\n")
    cfg = load_config(tmp_path / "e", ["model.layers.0.repeat=2"])
    assert cfg.model.layers == [LayerGroup("Norm->Attn->+->Norm->MLP->+", 2)]
    with pytest.raises(MicroArchError, match="index below 1"):
        load_config(tmp_path / "e", ["model.layers.3.repeat=2"])


@pytest.mark.parametrize("overrides,words", [
    (["model.d_modl=3"], ["unknown key 'd_modl'", "did you mean: d_model"]),
    (["trian.lr=3"], ["unknown key 'trian'", "did you mean: train"]),
    (["model.n_heads=many"], ["model.n_heads", "should be int"]),
    (["train.schedule=linear"], ["train.schedule", "one of 'cosine', 'wsd', 'constant'"]),
    (["model.layers.0.repeat=0"], ["repeat", "at least 1"]),
    (["model.n_kv_heads=3"], ["n_kv_heads", "multiple"]),
    (["train.lr"], ["key=value"]),
])
def test_bad_overrides(tmp_path, overrides, words):
    write(tmp_path / "e" / "config.yaml", "model: {d_model: 64}\n")
    with pytest.raises(MicroArchError) as info:
        load_config(tmp_path / "e", overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_yaml_exponent_floats(tmp_path):
    write(tmp_path / "e" / "config.yaml", "train:\n  lr: 1e-3\n  min_lr: 5E-5\n  grad_clip: 1e0\n")
    cfg = load_config(tmp_path / "e")
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.grad_clip) == (1e-3, 5e-5, 1.0)
    assert all(isinstance(v, float) for v in (cfg.train.lr, cfg.train.min_lr, cfg.train.grad_clip))


def test_unknown_key_in_a_file_names_the_nearest(tmp_path):
    write(tmp_path / "e" / "config.yaml", "model:\n  layers: [{spec: 'Norm->Attn->+', repaet: 2}]\n")
    with pytest.raises(MicroArchError, match=r"model.layers\[0\]: unknown key 'repaet' \(did you mean: repeat"):
        load_config(tmp_path / "e")


EXPERIMENTS = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/config.yaml"))


def test_experiments_are_found():
    assert {"shakespeare-char", "llama", "gpt2", "parallel-gptj", "post-norm"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_and_trains_one_step(name):
    cfg = load_experiment(ROOT / "experiments" / name, ["model.vocab_size=50"])
    specs = [s for g in cfg.model.layers for s in (g.spec if isinstance(g.spec, list) else [g.spec])]
    for role, target in cfg.model.defaults.items():  # blocks other engineers are still writing
        target = target.split("(")[0].strip()
        if any(role.lower() in s.lower() for s in specs) and target.lower() in ("moe", "mamba"):
            try:
                get_entry(target)
            except MicroArchError:
                pytest.skip(f"block {target!r} is not registered (yet)")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.num_params(non_embedding=True) > 0
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 50, (2, 16), generator=g), torch.randint(0, 50, (2, 16), generator=g)
    out = model(idx, targets)
    assert out.logits.shape == (2, 16, 50)
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(math.log(50), abs=1.0)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


def test_the_shared_dimensions_come_from_the_model_config_by_name():
    """Dims is filled from ModelConfig's fields of the same names (no hand-copied list to fall out of step):
    each such name is a ModelConfig field, and a built block sees the config's value."""
    from dataclasses import fields

    from micro_arch.config import ModelConfig
    from micro_arch.model.model import DIMS_FROM_CONFIG

    assert set(DIMS_FROM_CONFIG) <= {f.name for f in fields(ModelConfig)}
    assert {"d_model", "n_heads", "n_kv_heads", "d_ff", "rope_theta", "rope_scaling"} <= set(DIMS_FROM_CONFIG)
    cfg = ModelConfig(d_model=32, n_heads=2, vocab_size=11, rope_theta=500.0, dropout=0.25, max_seq_len=40)
    attention = next(m for m in Model(cfg).modules() if type(m).__name__ == "Attention")
    assert attention.dropout == 0.25 and attention.rope.shape[0] == 40
