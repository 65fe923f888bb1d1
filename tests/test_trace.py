"""`micro-arch trace`: shapes through every module, shapes inside attention, parameter counts, depth, --out."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from micro_arch.config import LayerGroup, ModelConfig
from micro_arch.model.model import Model
from micro_arch.model.trace import render, trace_model, trace_text

ROOT = Path(__file__).resolve().parents[1]
B, T, D, V = 2, 8, 32, 50


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def walk(node):
    yield node
    for child in node.children:
        yield from walk(child)


def small_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=16,
                      layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 1),
                              LayerGroup(["Norm->Attn(window=4)->+", "Norm->MLP->+"], 1)], **kw)
    return Model(cfg)


@pytest.fixture(scope="module")
def traced():
    model = small_model(tie_embeddings=False)
    return model, trace_model(model, torch.zeros(B, T, dtype=torch.long))


def test_every_block_reports_its_input_and_output_shapes(traced):
    model, root = traced
    by_name = {n.name: n for n in walk(root)}
    assert set(by_name) == {name or "model" for name, _ in model.named_modules()}
    assert root.inputs == [((B, T), "int64")] and root.outputs == [((B, T, V), "float32")]
    blocks = [name for name, _ in model.named_modules() if name.rsplit(".", 2)[-2:-1] == ["blocks"]]
    assert len(blocks) == 4 + 2 + 2 + 1  # layer 0, the two parallel branches of layer 1, the final norm
    for name in blocks:
        node = by_name[name]
        assert node.inputs == [((B, T, D), "float32")], name
        assert node.outputs == [((B, T, D), "float32")], name
    assert by_name["embed"].outputs == [((B, T, D), "float32")]
    assert by_name["head"].outputs == [((B, T, V), "float32")]
    qkv = by_name["layers.0.branches.0.blocks.1.qkv_proj"]
    assert qkv.outputs == [((B, T, (4 + 2 * 2) * 8), "float32")] and qkv.extra == f"{D}->64"


def test_attention_records_gqa_shapes(traced):
    _, root = traced
    attention = [n for n in walk(root) if n.kind == "Attention"]
    assert len(attention) == 2
    for node in attention:
        records = {name: shape for name, shape, _ in node.records}
        assert records["q"] == (B, 4, T, 8)  # (batch, query heads, seq, head_dim)
        assert records["k"] == records["v"] == (B, 2, T, 8)  # two K/V heads
        assert records["scores (inside SDPA)"] == (B, 4, T, T)
        assert records["attn_out"] == (B, 4, T, 8)
    assert all(not n.records for n in walk(root) if n.kind != "Attention")


def test_params_sum_over_children(traced):
    model, root = traced
    assert root.params == model.num_params() == sum(p.numel() for p in model.parameters())
    for node in walk(root):
        if node.children:
            module = model if node.name == "model" else model.get_submodule(node.name)
            own = sum(p.numel() for p in module.parameters(recurse=False))
            assert node.params == own + sum(c.params for c in node.children), node.name
    assert root.params == sum(c.params for c in root.children)  # untied: nothing is shared


def test_tied_head_is_counted_once_at_the_root():
    model = small_model(tie_embeddings=True)
    root = trace_model(model, torch.zeros(1, 4, dtype=torch.long))
    children = {c.name: c.params for c in root.children}
    assert children["embed"] == children["head"] == V * D
    assert root.params == model.num_params() == sum(children.values()) - V * D


def test_depth_limits_the_tree(traced):
    _, root = traced
    texts = {d: trace_text(render(root, depth=d)) for d in (1, 2, None)}
    lines = {d: len(t.splitlines()) for d, t in texts.items()}
    assert lines[1] < lines[2] < lines[None]
    for name in ("embed", "layers.0", "layers.1", "final_norm", "head"):
        assert name in texts[1]
    assert "qkv_proj" not in texts[1] and "Attention" not in texts[1] and "· q" not in texts[1]
    assert "branches.0" not in texts[1] and "branches.0" in texts[2]
    assert "Attention" not in texts[2] and "qkv_proj" not in texts[2]
    assert "qkv_proj" in texts[None] and "· q (2, 4, 8, 8)" in texts[None] and "· k (2, 2, 8, 8)" in texts[None]
    assert "(2, 8) -> (2, 8, 50)" in texts[1]


def test_trace_leaves_the_model_unchanged(traced):
    model, _ = traced
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training


def test_cli_trace_writes_the_out_file(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text(textwrap.dedent("""
        model:
          d_model: 32
          n_heads: 4
          n_kv_heads: 1
          layers: [{spec: 'Norm->Attn->+->Norm->MLP->+', repeat: 2}]
    """))
    out_file = tmp_path / "trace.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "micro_arch", "trace", str(exp), "--set", "model.vocab_size=50",
         "--batch", "2", "--seq-len", "8", "--out", str(out_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    text = out_file.read_text()
    assert "\x1b" not in text and "[bold]" not in text  # plain text, no colour codes or markup
    assert "Attention" in text and "SwiGLU" in text and "RMSNorm" in text
    assert "(2, 8) -> (2, 8, 50)" in text
    assert "· q (2, 4, 8, 8)" in text and "· k (2, 1, 8, 8)" in text  # MQA: one K/V head
    assert text.count("Attention") == 2
    assert f"written to {out_file}" in proc.stdout.replace("\n", "")
    assert "parameters" in proc.stdout


@pytest.mark.parametrize("experiment", ["moe", "arctic", "hybrid-mamba"])
def test_every_module_of_a_shipped_experiment_shows_shapes(experiment):
    """A module called as a function (its weight used directly) would show '- -> -': the MoE router was."""
    from micro_arch.experiment import load_experiment

    cfg = load_experiment(ROOT / "experiments" / experiment, ["model.vocab_size=50"])
    root = trace_model(Model(cfg.model), torch.zeros(1, 8, dtype=torch.long))
    silent = [n.name for n in walk(root) if not n.outputs and n.kind not in ("Dropout", "ModuleList", "ModuleDict")]
    assert not silent
