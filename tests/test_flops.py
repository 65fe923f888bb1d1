"""Model.flops_per_token against torch's FlopCounterMode counting a real forward pass.

Both count matrix products only (2 FLOPs per multiply-add); elementwise work is left out of both. The
one op FlopCounterMode cannot count on a CPU is attention (the CPU flash kernel has no formula): it
gets one here that counts 4 x head_dim FLOPs per (query, key) pair that the mask passed to the kernel
actually allows, read from the mask itself (or the is_causal flag), which is the convention
Model.flops_per_token documents. So the two must agree to rounding: the tolerance is 1e-9, relative.
"""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import micro_arch.blocks  # noqa: F401
from micro_arch.blocks.attention import attended_keys_per_query
from micro_arch.config import ExperimentConfig, LayerGroup, ModelConfig
from micro_arch.experiment import load_experiment
from micro_arch.model.model import Model

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
EXPERIMENTS = sorted(p.name for p in EXPERIMENTS_DIR.iterdir() if (p / "config.yaml").is_file())
aten = torch.ops.aten


def sdpa_flops(query, key, value, *args, attn_mask=None, out_val=None, **kwargs) -> int:
    """QK^T and AV over the allowed pairs: 2 products x 2 FLOPs x head_dim per pair."""
    is_causal = kwargs.get("is_causal", args[1] if len(args) > 1 else False)
    b, h, t, d = query.shape
    s = key.shape[-2]
    if attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        pairs = int(allowed.expand(b, h, t, s).sum())
    elif is_causal:
        assert t == s
        pairs = b * h * t * (t + 1) // 2
    else:
        pairs = b * h * t * s
    return 4 * d * pairs


sdpa_flops._get_raw = True  # FlopCounterMode passes the tensors themselves, not their shapes


def counted_forward_flops(model: Model, batch: int, seq_len: int) -> tuple[float, dict]:
    idx = torch.randint(0, model.cfg.vocab_size, (batch, seq_len))
    counter = FlopCounterMode(display=False,
                              custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops})
    with counter, torch.no_grad():
        model(idx)
    per_op = {str(k): v / (batch * seq_len) for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / (batch * seq_len), per_op


def check(model: Model, seq_len: int, batch: int = 2) -> dict:
    counted, per_op = counted_forward_flops(model, batch, seq_len)
    analytic = model.flops_per_token(seq_len) / 3
    assert analytic == pytest.approx(counted, rel=1e-9), per_op
    return per_op


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_counts_what_its_forward_runs(name):
    cfg = load_experiment(EXPERIMENTS_DIR / name, ["model.vocab_size=96"])
    check(Model(cfg.model), cfg.train.seq_len)


def model(spec: str, seq: int = 48, d: int = 64, **kw) -> Model:
    return Model(ModelConfig(d_model=d, n_heads=4, vocab_size=50, max_seq_len=seq, layers=[LayerGroup(spec, 2)],
                             **kw))


def test_dense_counts_weights_head_and_causal_attention_pairs():
    m = model("Norm->Attn->+->Norm->MLP->+", positions="learned", tie_embeddings=False)
    per_op = check(m, 48)
    assert {"aten.mm", "aten._scaled_dot_product_flash_attention_for_cpu"} <= set(per_op)
    # the causal square's lower half, diagonal included: (48 + 1) / 2 keys per query, 2 layers
    assert per_op["aten._scaled_dot_product_flash_attention_for_cpu"] == pytest.approx(2 * 4 * 64 * 24.5)


@pytest.mark.parametrize("window,seq", [(8, 48), (16, 33), (64, 48), (1, 20)])
def test_sliding_window_counts_only_the_window(window, seq):
    m = model(f"Norm->Attn(window={window})->+->Norm->MLP->+", seq=seq)
    per_op = check(m, seq)
    full = model("Norm->Attn->+->Norm->MLP->+", seq=seq)
    if window < seq:
        assert m.flops_per_token(seq) < full.flops_per_token(seq)
    keys = sum(min(t + 1, window) for t in range(seq)) / seq
    assert attended_keys_per_query(seq, window) == pytest.approx(keys)
    assert per_op["aten._scaled_dot_product_flash_attention_for_cpu"] == pytest.approx(2 * 4 * 64 * keys)


@pytest.mark.parametrize("scan", ["chunked", "parallel", "sequential"])
@pytest.mark.parametrize("seq", [13, 40])
def test_mamba_counts_projections_conv_and_state_readout(scan, seq):
    m = model(f"Norm->Mamba(scan={scan})->+->Norm->MLP->+", seq=seq, positions="none")
    per_op = check(m, seq)
    assert {"aten.mm", "aten.convolution", "aten.bmm"} <= set(per_op)


@pytest.mark.parametrize("moe", ["moe(n_experts=8, top_k=2, d_ff=96)",
                                 "moe(n_experts=4, top_k=1, n_shared_experts=1, capacity_factor=1.0)"])
def test_moe_counts_router_and_routed_experts_only(moe):
    m = model(f"Norm->Attn->+->Norm->{moe}->+")
    per_op = check(m, 48)
    assert "micro_arch.moe_grouped_mm" in per_op  # the experts ran through the grouped matmul, and counted


def test_moe_experiment_is_cheaper_than_the_dense_default():
    flops = {name: Model(load_experiment(EXPERIMENTS_DIR / name, ["model.vocab_size=96"]).model).flops_per_token(64)
             for name in ("moe", "shakespeare-char")}
    assert flops["moe"] < flops["shakespeare-char"]


def test_nested_blocks_are_counted_once():
    cfg = ExperimentConfig(model=ModelConfig(d_model=32, n_heads=2, vocab_size=20, max_seq_len=16,
                                             layers=[LayerGroup("Norm->Mamba->+", 1)]))
    m = Model(cfg.model)
    mamba = m.layers[0].branches[0].blocks[1]
    mamba.x_proj.forward_flops_per_token = lambda seq_len: 10**9  # a sub-module's count inside a counted block
    assert m.flops_per_token(16) < 10**9
