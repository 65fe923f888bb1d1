"""The attention block against attention written out by hand: MHA, GQA, MQA, RoPE, windows, QK-norm, KV cache."""

import math

import pytest
import torch

from micro_arch.blocks.attention import apply_rope, rope_tables
from micro_arch.errors import MicroArchError
from micro_arch.model.registry import Dims, build_block
from micro_arch.model.state import BlockState

D_MODEL, N_HEADS = 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def make_attn(seed=0, n_heads=N_HEADS, n_kv_heads=None, positions="none", max_seq_len=64, **kwargs):
    torch.manual_seed(seed)
    dims = Dims(d_model=D_MODEL, n_heads=n_heads, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len,
                positions=positions)
    attn = build_block("attention", dims, **kwargs)
    with torch.no_grad():  # every parameter random, so that no weight hides a mistake by being 0 or 1
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.eval()


def rope_reference(x, positions, theta=10000.0):
    """Rotate pairs (x[2j], x[2j+1]) by angle pos * theta^(-2j/d), written with cos and sin. x: (B, T, H, D)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def reference_attention(attn, x, positions=None, window=None, rope=False, qk_norm=False, theta=10000.0):
    """softmax(q k^T / sqrt(d) + mask) v over explicitly repeated K/V heads, from the block's weights."""
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    positions = torch.arange(T) if positions is None else positions
    qkv = x @ attn.qkv_proj.weight.T
    if attn.qkv_proj.bias is not None:
        qkv = qkv + attn.qkv_proj.bias
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D: (H + KV) * D].view(B, T, KV, D)
    v = qkv[..., (H + KV) * D:].view(B, T, KV, D)
    if qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.k_norm
    if rope:
        q, k = rope_reference(q, positions, theta), rope_reference(k, positions, theta)
    group = H // KV
    k = torch.stack([k[:, :, h // group] for h in range(H)], dim=2)  # head h reads K/V head h // group
    v = torch.stack([v[:, :, h // group] for h in range(H)], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, H * D)
    y = y @ attn.out_proj.weight.T
    if attn.out_proj.bias is not None:
        y = y + attn.out_proj.bias
    return y


def run(attn, x, offset=0, cache=None, recorder=None):
    T = x.shape[1]
    state = BlockState(positions=torch.arange(offset, offset + T), cache=cache, recorder=recorder)
    with torch.no_grad():
        return attn(x, state)


def rand_x(B=2, T=12, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
def test_mha_equals_explicit_attention(bias):
    attn = make_attn(bias=bias)
    assert attn.n_kv_heads == N_HEADS
    x = rand_x()
    torch.testing.assert_close(run(attn, x), reference_attention(attn, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("positions", ["none", "rope"])
def test_attention_equals_explicit_reference(n_kv_heads, positions):
    attn = make_attn(n_kv_heads=n_kv_heads, positions=positions)
    x = rand_x()
    ref = reference_attention(attn, x, rope=positions == "rope")
    torch.testing.assert_close(run(attn, x), ref, atol=1e-5, rtol=1e-4)
    if positions == "rope":  # the reference without rotation is a different function: RoPE really acts
        assert not torch.allclose(run(attn, x), reference_attention(attn, x, rope=False), atol=1e-3)


def test_rope_with_offset_equals_reference_at_those_positions():
    attn = make_attn(positions="rope", n_kv_heads=2)
    x = rand_x(T=8)
    ref = reference_attention(attn, x, positions=torch.arange(20, 28), rope=True)
    torch.testing.assert_close(run(attn, x, offset=20), ref, atol=1e-5, rtol=1e-4)


def test_rope_theta_is_used():
    attn = make_attn(positions="rope", rope_theta=500.0)
    x = rand_x()
    torch.testing.assert_close(run(attn, x), reference_attention(attn, x, rope=True, theta=500.0),
                               atol=1e-5, rtol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads():
    H, KV, D = N_HEADS, 2, D_MODEL // N_HEADS
    gqa = make_attn(n_kv_heads=KV, positions="rope", bias=True)
    mha = make_attn(n_kv_heads=H, positions="rope", bias=True, seed=5)
    group = H // KV

    def repeat_heads(t):  # (KV*D, ...) -> (H*D, ...): each K/V head copied for the `group` query heads it serves
        return t.unflatten(0, (KV, D)).repeat_interleave(group, dim=0).flatten(0, 1)

    with torch.no_grad():
        for name in ("weight", "bias"):
            src = getattr(gqa.qkv_proj, name)
            q, k, v = src[: H * D], src[H * D: (H + KV) * D], src[(H + KV) * D:]
            getattr(mha.qkv_proj, name).copy_(torch.cat([q, repeat_heads(k), repeat_heads(v)]))
            getattr(mha.out_proj, name).copy_(getattr(gqa.out_proj, name))
    assert gqa.qkv_proj.weight.shape[0] == (H + 2 * KV) * D
    x = rand_x()
    torch.testing.assert_close(run(gqa, x), run(mha, x), atol=1e-5, rtol=1e-4)


def test_mqa_has_one_kv_head():
    attn = make_attn(n_kv_heads=1, positions="rope")
    D = D_MODEL // N_HEADS
    assert attn.qkv_proj.weight.shape == ((N_HEADS + 2) * D, D_MODEL)
    shapes = {}
    x = rand_x()
    y = run(attn, x, recorder=lambda name, t: shapes.setdefault(name, tuple(t.shape)))
    assert shapes["q"] == (2, N_HEADS, 12, D) and shapes["k"] == shapes["v"] == (2, 1, 12, D)
    torch.testing.assert_close(y, reference_attention(attn, x, rope=True), atol=1e-5, rtol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    D = 16
    rot = torch.view_as_real(rope_tables(D, 128, 10000.0))  # (cos, sin) pairs, as the block keeps them
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)

    def score(m, n):
        return float(apply_rope(q, rot[m]) @ apply_rope(k, rot[n]))

    for m, n, shift in [(5, 2, 7), (9, 9, 40), (3, 0, 100), (60, 1, 11)]:
        assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and they do depend on the relative position
    # the block's rotation is the rotation written independently here
    x = torch.randn(1, 6, 2, D, generator=g)
    pos = torch.arange(30, 36)
    torch.testing.assert_close(apply_rope(x, rot[pos, None]), rope_reference(x, pos), atol=1e-5, rtol=1e-5)


def test_rope_compiled_form_equals_the_eager_complex_multiply(monkeypatch):
    """Under torch.compile the rotation is written in real numbers (Inductor has no complex codegen); the two
    forms must agree, in fp32 and in bf16."""
    g = torch.Generator().manual_seed(1)
    rot = torch.view_as_real(rope_tables(16, 64, 10000.0))[torch.arange(64), None]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 64, 3, 16, generator=g).to(dtype)
        eager = apply_rope(x, rot)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        written_out = apply_rope(x, rot)
        monkeypatch.undo()
        assert written_out.dtype == eager.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 2**-8  # the same fp32 product, rounded once to dtype
        torch.testing.assert_close(written_out.float(), eager.float(), atol=1e-6, rtol=tol)
        torch.testing.assert_close(eager.float(), rope_reference(x.float(), torch.arange(64)).to(dtype).float(),
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_rope_inside_the_block_shifted_positions_keep_scores():
    attn = make_attn(positions="rope")
    x = rand_x(B=1, T=6)
    rec = {}

    def recorder(tag):
        return lambda name, t: rec.__setitem__((tag, name), t.clone())

    y0 = run(attn, x, offset=0, recorder=recorder(0))
    y1 = run(attn, x, offset=17, recorder=recorder(17))
    s0 = rec[0, "q"] @ rec[0, "k"].transpose(-1, -2)
    s1 = rec[17, "q"] @ rec[17, "k"].transpose(-1, -2)
    assert not torch.allclose(rec[0, "q"], rec[17, "q"], atol=1e-3)  # absolute rotations differ
    torch.testing.assert_close(s0, s1, atol=1e-4, rtol=1e-4)  # their products do not
    torch.testing.assert_close(y0, y1, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["none", "rope"])
def test_sliding_window_is_a_banded_mask(positions):
    window = 3
    attn = make_attn(window=window, positions=positions, n_kv_heads=2)
    x = rand_x(T=12)
    y = run(attn, x)
    rope = positions == "rope"
    torch.testing.assert_close(y, reference_attention(attn, x, window=window, rope=rope), atol=1e-5, rtol=1e-4)
    full = reference_attention(attn, x, rope=rope)
    # the first `window` tokens see everything before them anyway; later ones do not
    torch.testing.assert_close(y[:, :window], full[:, :window], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(y[:, window:], full[:, window:], atol=1e-3)


def test_window_of_one_attends_only_to_itself():
    attn = make_attn(window=1)
    x = rand_x()
    H, D = attn.n_heads, attn.head_dim
    v = (x @ attn.qkv_proj.weight.T)[..., 2 * H * D:]  # MHA: V of each token is its own output
    torch.testing.assert_close(run(attn, x), v @ attn.out_proj.weight.T, atol=1e-5, rtol=1e-4)


def test_qk_norm_normalises_q_and_k():
    attn = make_attn(qk_norm=True, positions="rope", n_kv_heads=2)
    with torch.no_grad():
        attn.q_norm.fill_(1.0)
        attn.k_norm.fill_(1.0)
    rec = {}
    x = rand_x() * 10.0
    run(attn, x, recorder=lambda name, t: rec.__setitem__(name, t))
    for name in ("q", "k"):  # RoPE rotates pairs, so it keeps each head vector's RMS
        rms = rec[name].pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=1e-4)
    assert (rec["v"].pow(2).mean(-1).sqrt() - 1).abs().max() > 0.5  # v is left alone


def test_qk_norm_equals_reference_with_its_weights():
    attn = make_attn(qk_norm=True, positions="rope", n_kv_heads=2)
    x = rand_x()
    ref = reference_attention(attn, x, rope=True, qk_norm=True)
    torch.testing.assert_close(run(attn, x), ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(run(attn, x), reference_attention(attn, x, rope=True), atol=1e-3)


@pytest.mark.parametrize("n_kv_heads,window,positions", [(4, None, "rope"), (2, None, "rope"),
                                                         (1, 4, "rope"), (2, 3, "none")])
def test_kv_cache_prefill_then_one_token_at_a_time_equals_one_call(n_kv_heads, window, positions):
    attn = make_attn(n_kv_heads=n_kv_heads, window=window, positions=positions)
    x = rand_x(T=14)
    full = run(attn, x)
    cache = {}
    parts = [run(attn, x[:, :5], offset=0, cache=cache)]
    assert attn in cache and cache[attn][0].shape[2] == 5
    for t in range(5, 9):
        parts.append(run(attn, x[:, t:t + 1], offset=t, cache=cache))
    parts.append(run(attn, x[:, 9:14], offset=9, cache=cache))  # a multi-token chunk after the prefill
    assert cache[attn][0].shape[2] == 14 and cache[attn][0].shape[1] == n_kv_heads
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_model_kv_cache_equals_full_forward():
    from micro_arch.config import LayerGroup, ModelConfig
    from micro_arch.model.model import Model

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, vocab_size=40, max_seq_len=32,
                      layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 2),
                              LayerGroup("Norm->Attn(window=3)->+", 1)])
    model = Model(cfg).eval()
    idx = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx).logits
        state = BlockState(cache={})
        steps = [model(idx[:, :4], state=state).logits]
        for t in range(4, 10):
            state.positions = torch.tensor([t])
            steps.append(model(idx[:, t:t + 1], state=state).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dims,kwargs,needle", [
    (dict(n_heads=4, n_kv_heads=3), {}, "multiple of n_kv_heads"),
    (dict(n_heads=4), {"window": 0}, "window=0 must be at least 1"),
    (dict(n_heads=4, head_dim=7), {}, "even head_dim"),
    (dict(n_heads=4), {"windw": 8}, "takes no argument 'windw'"),
    (dict(n_heads=4), {"window": "wide"}, "window='wide' should be int"),
    (dict(n_heads=4), {"qk_norm": 1}, "qk_norm=1 should be bool"),
])
def test_bad_arguments_raise_microarch_error(dims, kwargs, needle):
    with pytest.raises(MicroArchError) as err:
        build_block("attention", Dims(d_model=D_MODEL, **dims), **kwargs)
    assert needle in str(err.value)
    assert "Traceback" not in str(err.value)
