"""Hugging Face interop: model.init_from (run directories and HF folders) and micro-arch export."""

import json
import textwrap

import pytest
import torch

from micro_arch.checkpoint import latest_checkpoint, load_checkpoint
from micro_arch.commands.run import run_experiment
from micro_arch.config import ModelConfig, from_dict
from micro_arch.errors import MicroArchError
from micro_arch.experiment import load_experiment
from micro_arch.hf.init import load_initial_weights
from micro_arch.model.model import Model
from micro_arch.rundir import read_run_config

TINY = """
model:
  d_model: 32
  n_heads: 2
  max_seq_len: 32
  positions: learned
  layers: [{spec: "Norm->Attn->+->Norm->MLP->+", repeat: 2}]
  tie_embeddings: false
data: {source: shakespeare, tokenizer: char}
train:
  batch_size: 2
  seq_len: 32
  max_steps: 3
  warmup_steps: 1
  eval_every: 3
  eval_batches: 1
  log_every: 1
  checkpoint_every: 3
  sample: {prompts: ["A"], max_new_tokens: 2}
"""


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parent")
    exp = root / "tiny"
    exp.mkdir()
    (exp / "config.yaml").write_text(textwrap.dedent(TINY))
    return exp, run_experiment(exp, runs_root=root / "runs")


def child_config(exp, run_dir, *overrides):
    cfg = load_experiment(exp, [f"model.init_from={run_dir}", *overrides])
    cfg.model.vocab_size = cfg.model.vocab_size or read_run_config(run_dir).model.vocab_size
    return cfg


def test_init_from_a_run_loads_its_weights_exactly(parent_run, tmp_path):
    exp, run_dir = parent_run
    saved = load_checkpoint(latest_checkpoint(run_dir))["model"]
    cfg = child_config(exp, run_dir)
    model = Model(cfg.model)
    parent = load_initial_weights(model, cfg.model, tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert parent["run_id"] == run_dir.name and parent["step"] == 3 and parent["changed"] == {}
    assert json.loads((tmp_path / "parent.json").read_text())["path"] == str(run_dir.resolve())


def test_init_from_extends_positions_and_grows_the_vocabulary(parent_run):
    exp, run_dir = parent_run
    saved = load_checkpoint(latest_checkpoint(run_dir))["model"]
    vocab = read_run_config(run_dir).model.vocab_size
    cfg = child_config(exp, run_dir, "model.max_seq_len=80", f"model.vocab_size={vocab + 5}", "model.dropout=0.1")
    model = Model(cfg.model)
    parent = load_initial_weights(model, cfg.model)
    old = saved["pos_embed.weight"]
    assert torch.equal(model.pos_embed.weight[:32], old)
    assert torch.equal(model.pos_embed.weight[32:64], old) and torch.equal(model.pos_embed.weight[64:], old[:16])
    for key in ("embed.weight", "head.weight"):
        grown = model.state_dict()[key]
        assert torch.equal(grown[:vocab], saved[key])
        torch.testing.assert_close(grown[vocab:], saved[key].mean(0).expand(5, -1))
    assert parent["changed"] == {"max_seq_len": [32, 80], "vocab_size": [vocab, vocab + 5], "dropout": [0.0, 0.1]}


@pytest.mark.parametrize("override, message", [
    ("model.d_model=64", "model.d_model is 32 in the source, 64 here"),
    ("model.layers.0.spec=Norm->Attn(window=8)->+->Norm->MLP->+",
     "layer 0, branch 0, block 1 (Attention): window is None in the source, 8 here"),
    ("model.defaults.MLP=gelu_mlp", "layer 0, branch 0, block 3 is SwiGLU in the source, GeluMLP here"),
    ("model.vocab_size=60", "model.vocab_size is 84 in the source, 60 here"),  # the corpus has 84 characters
    # issue 25: a layer of another shape in the block strings' words, not as internal tuples
    ('model.layers.0.spec=["Norm->Attn->+", "Norm->MLP->+"]', "the source's layer 0 has 1 branch, this one 2"),
    ("model.layers.0.spec=Norm->Attn->+->MLP->+",
     "layer 0 is 'rmsnorm->attention->+->rmsnorm->swiglu->+' in the source, 'rmsnorm->attention->+->swiglu->+' here"),
])
def test_init_from_a_mismatching_config_names_the_first_difference(parent_run, override, message):
    exp, run_dir = parent_run
    cfg = child_config(exp, run_dir, override)
    with pytest.raises(MicroArchError, match="does not match the source") as err:
        load_initial_weights(Model(cfg.model), cfg.model)
    assert message in str(err.value)
    assert "plan" not in str(err.value) and "(0, 1" not in str(err.value)


def test_init_from_a_missing_path_or_hub_name_fails_fast():
    cfg = from_dict(ModelConfig, {"vocab_size": 10, "init_from": "meta-llama/Llama-3.2-1B"})
    with pytest.raises(MicroArchError, match="hub name, and micro-arch never downloads"):
        load_initial_weights(Model(cfg), cfg)


def test_a_run_started_from_a_parent_records_it_and_starts_from_its_weights(parent_run, tmp_path):
    exp, run_dir = parent_run
    child = run_experiment(exp, runs_root=tmp_path / "runs",
                           overrides=[f"model.init_from={run_dir}", "train.max_steps=1", "train.lr=1e-9",
                                      "train.min_lr=1e-9", "train.eval_every=1", "train.checkpoint_every=1"])
    parent = json.loads((child / "parent.json").read_text())
    assert parent["run_id"] == run_dir.name and parent["experiment"] == "tiny"
    before = load_checkpoint(latest_checkpoint(run_dir))["model"]
    after = load_checkpoint(latest_checkpoint(child))["model"]
    for key in before:  # one step at lr 1e-9 moves nothing visibly: the child started from the parent
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)


# --- layouts: micro-arch -> transformers and back ------------------------------------------------------

PRE_NORM = [{"spec": "Norm->Attn->+->Norm->MLP->+", "repeat": 2}]
QWEN3_ATTN = {"Norm": "rmsnorm(eps=1e-6)", "Attn": "attention(qk_norm=true)"}
MIXED = [{"spec": "Norm->Attn->+->Norm->MLP->+", "repeat": 1}, {"spec": "Norm->Attn->+->Norm->MoE->+", "repeat": 2},
         {"spec": "Norm->Attn->+->Norm->MLP->+", "repeat": 1}]  # dense layers 0 and 3 among the MoE layers
LAYOUTS = {  # name: (model config, the transformers class it must map to)
    "llama-gqa-untied": ({"n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 500.0}, "LlamaForCausalLM"),
    "llama-interpolated": ({"rope_scaling": 4.0}, "LlamaForCausalLM"),  # RoPE position interpolation: 'linear'
    "llama-mqa-biases": ({"n_kv_heads": 1, "defaults": {"Attn": "attention(bias=true)", "MLP": "swiglu(bias=true)"}},
                         "LlamaForCausalLM"),
    "qwen3-qk-norm": ({"n_kv_heads": 2, "head_dim": 16, "defaults": {"Norm": "rmsnorm(eps=1e-6)",
                                                                     "Attn": "attention(qk_norm=true)"}},
                      "Qwen3ForCausalLM"),
    "mistral-window": ({"n_kv_heads": 2, "defaults": {"Attn": "attention(window=5)"}}, "MistralForCausalLM"),
    "mixtral-top2": ({"n_kv_heads": 2, "defaults": {"MoE": "moe(n_experts=4, top_k=2, d_ff=48)"},
                      "layers": [{"spec": "Norm->Attn->+->Norm->MoE->+", "repeat": 2}]}, "MixtralForCausalLM"),
    "qwen2-moe-switch": ({"n_kv_heads": 2, "defaults": {"MoE": "moe(n_experts=4, top_k=1, d_ff=48)"},
                          "layers": [{"spec": "Norm->Attn->+->Norm->MoE->+", "repeat": 2}]}, "Qwen2MoeForCausalLM"),
    "qwen3-moe-top2": ({"n_kv_heads": 2, "head_dim": 16, "defaults": {
        "Norm": "rmsnorm(eps=1e-6)", "Attn": "attention(qk_norm=true)", "MoE": "moe(n_experts=4, top_k=2, d_ff=48)"},
        "layers": [{"spec": "Norm->Attn->+->Norm->MoE->+", "repeat": 2}]}, "Qwen3MoeForCausalLM"),
    "qwen3-moe-switch-window-biases": ({"n_kv_heads": 1, "tie_embeddings": False, "defaults": {
        "Norm": "rmsnorm(eps=1e-6)", "Attn": "attention(qk_norm=true, window=7, bias=true)",
        "MoE": "moe(n_experts=4, top_k=1, d_ff=48)"}, "layers": [{"spec": "Norm->Attn->+->Norm->MoE->+", "repeat": 2}]},
        "Qwen3MoeForCausalLM"),
    "qwen3-moe-dense-layers": ({"n_kv_heads": 2, "head_dim": 16, "d_ff": 40, "defaults": {**QWEN3_ATTN,
                                "MoE": "moe(n_experts=4, top_k=2, d_ff=24)"}, "layers": MIXED}, "Qwen3MoeForCausalLM"),
    "qwen2-moe-switch-dense-layers": ({"n_kv_heads": 2, "d_ff": 40, "defaults": {"MoE": "moe(n_experts=4, top_k=1, "
                                       "d_ff=24)"}, "layers": MIXED}, "Qwen2MoeForCausalLM"),
    "gpt2": ({"positions": "learned", "defaults": {"Norm": "layernorm", "Attn": "attention(bias=true)",
                                                   "MLP": "gelu_mlp"}}, "GPT2LMHeadModel"),
    "gpt2-no-biases-untied": ({"positions": "learned", "tie_embeddings": False,
                               "defaults": {"Norm": "layernorm(bias=false)", "MLP": "gelu_mlp(bias=false)"}},
                              "GPT2LMHeadModel"),
    "mamba": ({"positions": "none", "defaults": {"Mamba": "mamba(d_state=8)"},
               "layers": [{"spec": "Norm->Mamba->+", "repeat": 2}]}, "MambaForCausalLM"),
}


def random_model(settings: dict, seed: int = 0) -> Model:
    """A small micro-arch model with every weight random (norm scales and biases too, so a mix-up shows)."""
    torch.manual_seed(seed)
    cfg = from_dict(ModelConfig, {"d_model": 32, "n_heads": 4, "vocab_size": 50, "max_seq_len": 64,
                                  "layers": PRE_NORM, **settings})
    model = Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def randomise_hf(model, seed: int = 1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.02))
    return model


PROMPT = torch.tensor([[3, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7]])


@torch.no_grad()
def greedy_pair(ours, theirs, n=30):
    from micro_arch.eval.generate import generate

    mine = generate(ours, PROMPT, n, temperature=0.0, use_cache=True)
    other = theirs.generate(PROMPT, max_new_tokens=n, do_sample=False, use_cache=True, min_new_tokens=n)
    return mine, other


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_export_import_round_trip_per_layout(name, tmp_path):
    from transformers import AutoModelForCausalLM

    from micro_arch.hf.export import build_hf_model
    from micro_arch.hf.layouts import layout_of
    from micro_arch.hf.load import load_hf_model
    from micro_arch.hf.weights import to_hf

    settings, hf_class = LAYOUTS[name]
    ours = random_model(settings)
    layout = layout_of(ours)
    assert layout.hf_class == hf_class
    theirs = build_hf_model(layout, to_hf(layout, ours.state_dict()))
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=idx).logits, ours(idx).logits, atol=1e-5, rtol=0)
    mine, other = greedy_pair(ours, theirs)
    assert torch.equal(mine, other)

    # transformers -> micro-arch, from a folder transformers wrote itself with its own (randomised) weights
    native = randomise_hf(build_hf_model(layout))
    native.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    back = load_hf_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, loaded(input_ids=idx).logits, atol=1e-5, rtol=0)
    mine, other = greedy_pair(back, loaded)
    assert torch.equal(mine, other)


REFUSED = {  # experiment: what the one line must name
    "shakespeare-char": "LayerNorm with positions=rope and SwiGLU; set model.defaults.Norm: rmsnorm",
    "parallel-gptj": "layer 0 has 2 parallel branches",
    "post-norm": "post-norm",
    "sandwich-norm": "sandwich norm",
    "hybrid-mamba": "a Mamba layer with more in it",
    "mamba": "layer 0 is layernorm->mamba->+->layernorm->swiglu->+",
    "arctic": "parallel branches",
    "sliding-window": "layer 3's Attention has window=None but layer 0's has 16: sliding windows in some layers only",
    "gpt2": None,  # maps
    "llama": None,
    "mqa": None,
    "moe": "LayerNorm with positions=rope and MoE; set model.defaults.Norm: rmsnorm; nearest supported layout: Mixtral",
}


@pytest.mark.parametrize("experiment", list(REFUSED))
def test_shipped_experiments_map_or_are_refused_in_one_line(experiment):
    from micro_arch.hf.layouts import layout_of

    cfg = load_experiment(f"experiments/{experiment}", ["model.vocab_size=50", "model.d_model=32"])
    model = Model(cfg.model)
    if REFUSED[experiment] is None:
        assert layout_of(model).hf_class
        return
    with pytest.raises(MicroArchError) as err:
        layout_of(model)
    text = str(err.value)
    assert "\n" not in text and text.startswith("cannot export: ") and "nearest supported layout: " in text
    assert REFUSED[experiment] in text



@pytest.mark.parametrize("attn, moe, nearest, reason", [
    ({}, "moe(router=sigmoid)", "Mixtral", "router='sigmoid'"),
    ({}, "moe(balance=bias)", "Mixtral", "balance='bias'"),
    ({}, "moe(capacity_factor=1.25)", "Mixtral", "capacity_factor=1.25 drops tokens"),
    ({}, "moe(n_shared_experts=1)", "Mixtral", "shared experts"),
    (QWEN3_ATTN, "moe(n_shared_experts=1, top_k=1)", "Qwen3-MoE", "MoE shared experts (Qwen3-MoE has none)"),
    (QWEN3_ATTN, "moe(expert=gelu)", "Qwen3-MoE", "expert='gelu' (Qwen3-MoE experts are SwiGLU)"),
    ({"Attn": "attention(qk_norm=true)"}, "moe", "Qwen3-MoE", "norm eps 1e-05 (Qwen3-MoE uses one eps"),
])
def test_moe_routing_that_the_moe_layouts_cannot_express_is_refused(attn, moe, nearest, reason):
    from micro_arch.hf.layouts import layout_of

    settings = {"defaults": {**attn, "MoE": moe}, "layers": [{"spec": "Norm->Attn->+->Norm->MoE->+", "repeat": 1}]}
    with pytest.raises(MicroArchError, match=f"nearest supported layout: {nearest} ") as err:
        layout_of(random_model(settings))
    assert reason in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("settings, reason", [
    ({"defaults": {"MoE": "moe(n_experts=4, top_k=2)"}},
     "dense SwiGLU layers [0, 3] among MoE layers with top_k=2: Mixtral has none"),
    ({"defaults": {**QWEN3_ATTN, "MLP": "swiglu(bias=true)"}},
     "MoE biases in the dense SwiGLU layers [0, 3] (Qwen-MoE's dense MLPs have none)"),
    ({"defaults": QWEN3_ATTN, "layers": [*MIXED[:2], {"spec": "Norm->Attn->+->Norm->MLP(d_ff=64)->+", "repeat": 1}]},
     "dense SwiGLU layers of different widths (40 in layer 0, 64 in layer 3); Qwen-MoE configs have one "
     "intermediate_size"),
])
def test_dense_layers_among_moe_layers_that_no_layout_expresses_are_refused(settings, reason):
    from micro_arch.hf.layouts import layout_of

    with pytest.raises(MicroArchError, match="nearest supported layout: Qwen3-MoE ") as err:
        layout_of(random_model({"d_ff": 40, "layers": MIXED, **settings}))
    assert reason in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["qwen3-moe-dense-layers", "qwen2-moe-switch-dense-layers"])
def test_dense_layers_among_moe_layers_export_as_mlp_only_layers_and_import_with_identical_weights(name, tmp_path):
    from micro_arch.hf.export import build_hf_model
    from micro_arch.hf.layouts import layout_of
    from micro_arch.hf.load import read_hf_folder
    from micro_arch.hf.weights import to_hf

    ours = random_model(LAYOUTS[name][0])
    layout = layout_of(ours)
    build_hf_model(layout, to_hf(layout, ours.state_dict())).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert [written[k] for k in ("mlp_only_layers", "decoder_sparse_step", "intermediate_size",
                                 "moe_intermediate_size")] == [[0, 3], 1, 40, 24]
    cfg, state, _ = read_hf_folder(tmp_path)
    assert [(g.spec, g.repeat) for g in cfg.layers] == [(g["spec"], g["repeat"]) for g in MIXED]
    Model(cfg).load_state_dict(state)  # strict: the imported config has exactly these weights
    assert state.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(state[key], value), key


def tiny_qwen3_moe(**overrides):
    """A Qwen3-MoE config written with transformers directly: what a downloaded checkpoint's config.json says."""
    from transformers import Qwen3MoeConfig

    settings = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 80, "moe_intermediate_size": 24,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 64,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **overrides}
    return Qwen3MoeConfig(**settings)


@pytest.mark.parametrize("overrides, ffns", [
    ({}, ["MoE", "MoE"]),
    ({"mlp_only_layers": [0, 2], "num_hidden_layers": 4}, ["SwiGLU", "MoE", "SwiGLU", "MoE"]),
    ({"decoder_sparse_step": 2, "mlp_only_layers": [3], "num_hidden_layers": 5}, ["SwiGLU", "MoE", *["SwiGLU"] * 3]),
])
def test_a_qwen3_moe_folder_written_by_transformers_imports_with_the_same_logits(overrides, ffns, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

    from micro_arch.hf.load import load_hf_model

    randomise_hf(Qwen3MoeForCausalLM(tiny_qwen3_moe(**overrides))).save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert ["SwiGLU" if hasattr(layer.mlp, "gate_proj") else "MoE" for layer in theirs.model.layers] == ffns
    ours = load_hf_model(tmp_path)
    blocks = [layer.branches[0].blocks[3] for layer in ours.layers]
    assert [type(b).__name__ for b in blocks] == ffns
    assert [b.hidden for b in blocks] == [80 if f == "SwiGLU" else 24 for f in ffns]  # intermediate_size, experts'
    assert (blocks[1].n_experts, blocks[1].top_k, ours.cfg.tie_embeddings) == (6, 2, False)
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, theirs(input_ids=idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, reason", [
    ({"norm_topk_prob": False}, "norm_topk_prob=False with top_k=2: micro-arch's moe renormalises the gates exactly "
                                "when top_k > 1"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05: micro-arch's qk-norm uses eps 1e-06"),
])
def test_a_qwen3_moe_folder_micro_arch_cannot_reproduce_is_refused(overrides, reason, tmp_path):
    from micro_arch.hf.load import read_hf_config

    tiny_qwen3_moe(**overrides).save_pretrained(tmp_path)
    with pytest.raises(MicroArchError) as err:
        read_hf_config(tmp_path)
    assert str(err.value) == f"{tmp_path}: cannot import: {reason}"


# --- the command: export a run, refuse a run, tokenizers, init_from a Hugging Face folder ----------------


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    exp = root / "tiny-llama"
    exp.mkdir()
    text = textwrap.dedent(TINY).replace("positions: learned", "positions: rope\n  n_kv_heads: 1")
    (exp / "config.yaml").write_text(text)
    return exp, run_experiment(exp, runs_root=root / "runs")


def test_export_writes_a_folder_transformers_loads_with_the_same_logits(llama_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from micro_arch.rundir import load_run
    from tests.helpers import run_cli

    _, run_dir = llama_run
    out = tmp_path / "hf"
    result = run_cli("export", run_dir, "--out", out, "--max-shard-size", "20KB")
    assert result.returncode == 0, result.stderr
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md",
            "model.safetensors.index.json"} <= files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert run_dir.name in (out / "README.md").read_text() and "loss.png" in files
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the rest (were 0600; issue 25)
    _, ours, tokenizer = load_run(run_dir)
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    idx = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=idx).logits, ours(idx).logits, atol=1e-5, rtol=0)
    text = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text) and hf_tok.decode(tokenizer.encode(text)) == text

    bf16 = tmp_path / "bf16"
    assert run_cli("export", run_dir, "--out", bf16, "--dtype", "bfloat16").returncode == 0
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_init_from_an_exported_folder_gives_back_the_same_model(llama_run, tmp_path):
    from micro_arch.hf.export import export_run
    from micro_arch.rundir import load_run

    exp, run_dir = llama_run
    export_run(run_dir, tmp_path / "hf", checkpoint="step_0000003.pt")  # a name inside the run's checkpoints/
    assert "step_0000003.pt" in (tmp_path / "hf" / "README.md").read_text()
    vocab = f"model.vocab_size={read_run_config(run_dir).model.vocab_size}"
    cfg = child_config(exp, tmp_path / "hf", vocab)
    model = Model(cfg.model)
    parent = load_initial_weights(model, cfg.model)
    assert parent["hf_class"] == "LlamaForCausalLM"
    _, ours, _ = load_run(run_dir)
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    cfg = child_config(exp, tmp_path / "hf", vocab, "model.n_kv_heads=2")
    with pytest.raises(MicroArchError, match="model.n_kv_heads is 1 in the source, 2 here"):
        load_initial_weights(Model(cfg.model), cfg.model)


@pytest.fixture(scope="module")
def qwen3_moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_moe")
    exp = root / "tiny-qwen3-moe"
    exp.mkdir()
    model = ("positions: rope\n  n_kv_heads: 1\n  defaults: {Norm: 'rmsnorm(eps=1e-6)', Attn: 'attention(qk_norm=true)', "
             "MoE: 'moe(n_experts=4, top_k=2, d_ff=24)'}")
    mixed = '[{spec: "Norm->Attn->+->Norm->MLP->+", repeat: 1}, {spec: "Norm->Attn->+->Norm->MoE->+", repeat: 1}]'
    text = textwrap.dedent(TINY).replace("positions: learned", model).replace(
        '[{spec: "Norm->Attn->+->Norm->MLP->+", repeat: 2}]', mixed)  # a dense layer, then an MoE layer
    (exp / "config.yaml").write_text(text)
    return exp, run_experiment(exp, runs_root=root / "runs")


def test_a_qwen3_moe_run_exports_and_its_folder_starts_the_same_model(qwen3_moe_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from micro_arch.hf.export import export_run
    from micro_arch.rundir import load_run

    exp, run_dir = qwen3_moe_run
    result = export_run(run_dir, tmp_path / "hf")
    assert result["hf_class"] == "Qwen3MoeForCausalLM" and result["max_abs_diff"] <= result["tolerance"]
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert [written[k] for k in ("model_type", "num_experts_per_tok", "norm_topk_prob", "mlp_only_layers")] == \
        ["qwen3_moe", 2, True, [0]]
    _, ours, tokenizer = load_run(run_dir)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    idx = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=idx).logits, ours(idx).logits, atol=1e-5, rtol=0)
    cfg = child_config(exp, tmp_path / "hf", f"model.vocab_size={read_run_config(run_dir).model.vocab_size}")
    model = Model(cfg.model)
    assert load_initial_weights(model, cfg.model)["hf_class"] == "Qwen3MoeForCausalLM"
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_refused_export_says_why_in_one_line_and_leaves_no_folder(parent_run, tmp_path):
    from tests.helpers import run_cli

    _, run_dir = parent_run  # RMSNorm with learned positions: neither Llama nor GPT-2
    result = run_cli("export", run_dir, "--out", tmp_path / "hf")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: cannot export: RMSNorm with positions=learned: the Llama family uses "
                                     "RoPE; nearest supported layout: Llama (LlamaForCausalLM): every layer "
                                     "Norm->Attn->+->Norm->MLP->+ with rmsnorm, attention, swiglu and RoPE")
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []


def test_export_makes_the_out_folder_but_never_its_parents(llama_run, tmp_path, capsys):
    from micro_arch.cli import main
    from micro_arch.hf.export import export_run

    target = tmp_path / "a" / "b" / "c"
    with pytest.raises(SystemExit) as info:
        main(["export", str(llama_run[1]), "--out", str(target)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and "does not exist" in err, err
    with pytest.raises(MicroArchError, match="does not exist; create it first"):
        export_run(llama_run[1], target)  # the library function keeps the rule too
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", ["foo", "0", "-1GB", "2 GiB"])
def test_a_shard_size_transformers_cannot_read_is_one_line_before_any_work(llama_run, tmp_path, size):
    from micro_arch.hf.export import export_run

    with pytest.raises(MicroArchError, match=r"--max-shard-size .*: a size such as 500MB or 2GB"):
        export_run(llama_run[1], tmp_path / "hf", max_shard_size=size)  # was a ValueError traceback
    assert list(tmp_path.iterdir()) == []


def test_an_export_whose_logits_disagree_is_removed(llama_run, tmp_path, monkeypatch):
    from micro_arch.hf import export

    monkeypatch.setattr(export, "LOGIT_TOLERANCE", -1.0)  # any difference, even 0, is now too much
    with pytest.raises(MicroArchError, match="logits differ by .*nothing was exported"):
        export.export_run(llama_run[1], tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_tokenizers_round_trip_the_shakespeare_text(tmp_path):
    from transformers import AutoTokenizer

    from micro_arch.data.corpus import shakespeare_documents
    from micro_arch.data.tokenizers import CharTokenizer, SentencePieceTokenizer, train_bpe
    from micro_arch.hf.tokenizer import hf_tokenizer

    train, held_out = shakespeare_documents()
    text = held_out[0][:100_000]
    for name, tokenizer in (("char", CharTokenizer.from_texts(train + held_out)),
                            ("bpe", SentencePieceTokenizer(train_bpe(train[:4], 500), "bpe"))):
        hf_tokenizer(tokenizer).save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name, local_files_only=True)
        ids = loaded(text)["input_ids"]
        assert ids == list(tokenizer.encode(text)), name
        assert loaded.decode(ids) == text, name


def test_a_chat_runs_tokens_and_template_export_with_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    from micro_arch.data.chat_template import SPECIAL_TOKENS, ChatTokenizer, render
    from micro_arch.data.corpus import shakespeare_documents
    from micro_arch.data.tokenizers import CharTokenizer
    from micro_arch.hf.tokenizer import hf_tokenizer

    train, held_out = shakespeare_documents()
    base = CharTokenizer.from_texts(train + held_out)
    messages = [{"role": "system", "content": "PERSONS: VIOLA, CAPTAIN."},
                {"role": "user", "content": "What country, friends, is this?"},
                {"role": "assistant", "content": "This is Illyria, lady.\n"}]
    ids = render(ChatTokenizer(base), messages, add_generation_prompt=True)
    ids = ids[0] if isinstance(ids, tuple) else ids
    hf_tokenizer(base, list(SPECIAL_TOKENS)).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    theirs = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == [int(i) for i in ids]
    assert loaded.eos_token_id == base.vocab_size + len(SPECIAL_TOKENS) - 1


def test_init_from_a_folder_of_another_model_type_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    cfg = from_dict(ModelConfig, {"vocab_size": 10, "init_from": str(tmp_path)})
    with pytest.raises(MicroArchError, match="cannot import: model_type 'bert' has no micro-arch layout; supported: "):
        load_initial_weights(Model(cfg), cfg)


def test_the_export_check_text_keeps_what_a_folders_tokenizer_can_encode(tmp_path):
    """A run started from a folder whose tokenizer lacks some characters of the fixed check text (here a
    character vocabulary, as micro-arch exports char runs) exported with a ValueError traceback."""
    from micro_arch.data.folder_tokenizer import FolderTokenizer
    from micro_arch.hf.export import _check_text
    from micro_arch.hf.tokenizer import _char_tokenizer, check_tokenizer, hf_tokenizer

    chars = "\n :ABCDEFIRSabcdefhikmnoprstuvwy,."
    base = FolderTokenizer(_char_tokenizer(chars), len(chars), "huggingface-chars")
    text = _check_text(tmp_path, base)
    assert set(text) <= set(chars) and len(text) > 40
    hf_tokenizer(base).save_pretrained(tmp_path / "tokenizer")
    check_tokenizer(tmp_path / "tokenizer", base, text)


def test_a_chat_run_from_a_padded_folder_exports_its_template_after_every_row(tmp_path):
    """A folder whose embedding has more rows than its tokenizer has ids (padded, as many released models are):
    an SFT run from it puts the template's tokens after the rows, and the export refused to write them there."""
    from transformers import AutoTokenizer

    from micro_arch.data.chat_template import SPECIAL_TOKENS, ChatTokenizer, render
    from micro_arch.data.folder_tokenizer import FolderTokenizer, folder_tokenizer
    from micro_arch.hf.tokenizer import _char_tokenizer, hf_tokenizer

    chars = "\n :ABCDEFINRSWabcdefhikmnoprstuvwy,.?"
    rows = len(chars) + 13  # the model's embedding rows before the template's
    chat = ChatTokenizer(FolderTokenizer(_char_tokenizer(chars), rows, "huggingface-padded"))
    hf_tokenizer(chat.base, list(SPECIAL_TOKENS)).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    messages = [{"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": "Nay, answer me."}]
    ids = render(chat, messages, add_generation_prompt=True)[0].tolist()
    theirs = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ids
    assert chat.role_id["system"] == rows and loaded.eos_token_id == rows + 3
    again = ChatTokenizer(folder_tokenizer(tmp_path, rows + len(SPECIAL_TOKENS), "test"))  # a further stage
    assert again.ids == chat.ids and again.encode("Who is there?") == chat.encode("Who is there?")
