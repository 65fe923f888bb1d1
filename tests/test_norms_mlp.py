"""Norms and MLPs against their formulas written out from their own weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from micro_arch.errors import MicroArchError
from micro_arch.model.registry import Dims, build_block

D = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module


def rand_x(*shape, seed=1, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + 0.7


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_rmsnorm_is_x_over_rms_times_weight(eps):
    norm = randomise(build_block("rmsnorm", Dims(d_model=D), eps=eps))
    x = rand_x(2, 5, D)
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / D + eps) * norm.weight
    torch.testing.assert_close(norm(x, None), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_low_precision_input_is_computed_in_float32_and_cast_back():
    norm = randomise(build_block("rmsnorm", Dims(d_model=D)))
    x = rand_x(3, D).bfloat16()
    y = norm(x, None)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    expected = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_gradients_equal_autograd_through_the_formula(dtype):
    norm = randomise(build_block("rmsnorm", Dims(d_model=D), eps=1e-3))
    x = rand_x(2, 7, D).to(dtype).requires_grad_()
    dy = rand_x(2, 7, D, seed=5).to(dtype)
    got = torch.autograd.grad(norm(x, None), (x, norm.weight), dy)
    xf = x.detach().float().requires_grad_()
    w = norm.weight.detach().clone().requires_grad_()
    naive = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-3) * w
    want = torch.autograd.grad(naive, (xf, w), dy.float())
    assert got[0].dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got[0].float(), want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


def test_rmsnorm_backward_passes_gradcheck_in_float64():
    from micro_arch.blocks.norms import rms_norm

    x = rand_x(3, 5, 6).double().requires_grad_()
    w = rand_x(6, seed=3).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-4).double(), (x, w))


def test_rmsnorm_output_has_unit_rms_with_unit_weight():
    norm = build_block("rmsnorm", Dims(d_model=D))
    y = norm(rand_x(4, D, scale=50.0), None)
    rms = y.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_naive_formula_and_torch(bias):
    norm = randomise(build_block("layernorm", Dims(d_model=D), bias=bias))
    assert (norm.bias is not None) == bias
    assert sum(p.numel() for p in norm.parameters()) == D * (2 if bias else 1)
    x = rand_x(2, 3, D)
    mean = x.sum(-1, keepdim=True) / D
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / D  # biased variance, as LayerNorm defines it
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + (norm.bias if bias else 0.0)
    y = norm(x, None)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (D,), norm.weight, norm.bias, 1e-5))


def test_layernorm_bias_false_from_a_spec():
    from micro_arch.model.spec import resolve_chain

    (call,) = resolve_chain("Norm(bias=false)", {"Norm": "layernorm"})
    norm = build_block(call.name, Dims(d_model=D), **call.kwargs)
    assert norm.bias is None


def gelu_exact(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_matches_formula(bias):
    mlp = randomise(build_block("gelu_mlp", Dims(d_model=D), bias=bias))
    assert mlp.up_proj.weight.shape == (4 * D, D)  # default width 4 * d_model
    x = rand_x(2, 5, D, scale=1.0)
    h = x @ mlp.up_proj.weight.T + (mlp.up_proj.bias if bias else 0.0)
    expected = gelu_exact(h) @ mlp.out_proj.weight.T + (mlp.out_proj.bias if bias else 0.0)
    torch.testing.assert_close(mlp(x, None), expected, atol=1e-4, rtol=1e-4)


def test_gelu_mlp_width_from_shared_d_ff():
    mlp = build_block("gelu_mlp", Dims(d_model=D, d_ff=40))
    assert mlp.up_proj.weight.shape == (40, D) and mlp.out_proj.weight.shape == (D, 40)


@pytest.mark.parametrize("d_ff", [None, 40])
def test_swiglu_matches_formula(d_ff):
    mlp = randomise(build_block("swiglu", Dims(d_model=D, d_ff=d_ff)))
    hidden = d_ff or 32 * math.ceil(int(8 * D / 3) / 32)  # Llama: 8/3 d_model, rounded up to a multiple of 32
    assert mlp.in_proj.weight.shape == (2 * hidden, D) and mlp.out_proj.weight.shape == (D, hidden)
    assert mlp.in_proj.bias is None
    x = rand_x(2, 5, D, scale=1.0)
    w_gate, w_up = mlp.in_proj.weight[:hidden], mlp.in_proj.weight[hidden:]
    gate, up = x @ w_gate.T, x @ w_up.T
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.out_proj.weight.T
    torch.testing.assert_close(mlp(x, None), expected, atol=1e-4, rtol=1e-4)
    # the gate and up halves are not interchangeable: silu makes the order matter
    swapped = (up * torch.sigmoid(up) * gate) @ mlp.out_proj.weight.T
    assert not torch.allclose(mlp(x, None), swapped, atol=1e-3)


@pytest.mark.parametrize("d_model,hidden", [(64, 192), (100, 288), (96, 256)])
def test_swiglu_default_width(d_model, hidden):
    mlp = build_block("swiglu", Dims(d_model=d_model))
    assert mlp.hidden == hidden  # int(8 d / 3) rounded up to a multiple of 32


def test_mlps_keep_the_shape():
    x = rand_x(3, 7, D)
    for name in ("gelu_mlp", "swiglu", "rmsnorm", "layernorm"):
        assert build_block(name, Dims(d_model=D))(x, None).shape == x.shape, name


def test_norm_rejects_unknown_argument():
    with pytest.raises(MicroArchError, match="takes no argument 'epsilon'.*did you mean: eps"):
        build_block("rmsnorm", Dims(d_model=D), epsilon=1e-6)
