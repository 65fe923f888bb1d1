"""The MoE block against naive references computed from its own weights."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import micro_arch.model.registry  # noqa: F401  (before micro_arch.blocks.moe: the registry must exist first)
from micro_arch.blocks.moe import MoE
from micro_arch.errors import MicroArchError
from micro_arch.model.model import Model
from micro_arch.model.registry import Dims, build_block
from micro_arch.model.state import BlockState


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(d_model=8, d_ff=12, n_experts=4, top_k=2) | kwargs
    block = MoE(**args).double()
    torch.nn.init.normal_(block.router.weight, 0.0, 1.0)  # decisive routing, no near-ties
    return block


def naive_expert(x, w_in, w_out, expert, hidden):
    if expert == "swiglu":
        return (F.silu(x @ w_in[:, :hidden]) * (x @ w_in[:, hidden:])) @ w_out
    return F.gelu(x @ w_in) @ w_out


def naive_moe(block, x):
    """Loop over tokens: sum of gate * expert(token) over the token's top-k experts."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            tok = x[b, t]
            logits = block.router.weight @ tok
            scores = logits.softmax(-1) if block.router_kind == "softmax" else logits.sigmoid()
            top = torch.topk(scores, block.top_k).indices
            gates = scores[top] / scores[top].sum() if block.top_k > 1 else scores[top]
            for g, e in zip(gates, top):
                out[b, t] += g * naive_expert(tok, block.w_in[e], block.w_out[e], block.expert, block.hidden)
            if block.shared is not None:
                sh = block.shared
                out[b, t] += naive_expert(tok, sh.in_proj.weight.t(), sh.out_proj.weight.t(), block.expert,
                                          sh.out_proj.weight.shape[1])
    return out


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("expert", ["swiglu", "gelu"])
def test_matches_token_loop(router, top_k, n_shared, expert):
    block = make(router=router, top_k=top_k, n_shared_experts=n_shared, expert=expert)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y = block(x, BlockState())
    assert y.shape == x.shape
    torch.testing.assert_close(y, naive_moe(block, x), rtol=1e-10, atol=1e-12)


def test_one_expert_is_a_plain_mlp():
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    block = make(n_experts=1, top_k=1)
    w1, w3, w2 = block.w_in[0, :, :12], block.w_in[0, :, 12:], block.w_out[0]
    torch.testing.assert_close(block(x, None), (F.silu(x @ w1) * (x @ w3)) @ w2, rtol=1e-10, atol=1e-12)
    block = make(n_experts=1, top_k=1, expert="gelu")
    torch.testing.assert_close(block(x, None), F.gelu(x @ block.w_in[0]) @ block.w_out[0], rtol=1e-10, atol=1e-12)


def test_default_widths():
    assert MoE(d_model=48).hidden == 128  # 8/3 * 48 = 128, a multiple of 32
    assert MoE(d_model=64).hidden == 192  # 170 rounded up to a multiple of 32
    assert MoE(d_model=48, expert="gelu").hidden == 192
    assert MoE(d_model=8, d_ff=20, n_shared_experts=2).shared.out_proj.weight.shape == (8, 40)


def test_gradients_reach_router_and_used_experts():
    block = make(n_experts=6, top_k=2)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    block(x, None).pow(2).sum().backward()
    used = set(block.last_load.nonzero().flatten().tolist())
    assert block.router.weight.grad.abs().sum() > 0
    for e in range(6):
        touched = block.w_in.grad[e].abs().sum() > 0 and block.w_out.grad[e].abs().sum() > 0
        assert touched == (e in used)


def router_case(rows, **kwargs):
    """A block whose router logits equal x (d_model = n_experts, identity router)."""
    block = MoE(d_model=len(rows[0]), d_ff=4, n_experts=len(rows[0]), **kwargs).double().train()
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(len(rows[0])))
        block.w_in.normal_()  # outputs of order 1, so that a missing or extra term shows
        block.w_out.normal_()
    return block, torch.tensor([rows], dtype=torch.float64)


def test_switch_and_z_loss_by_hand():
    ln3 = math.log(3)
    block, x = router_case([[ln3, 0], [ln3, 0], [0, ln3]], top_k=1, aux_loss_coef=1.0, z_loss_coef=1.0)
    state = BlockState()
    block(x, state)
    # probabilities (3/4, 1/4), (3/4, 1/4), (1/4, 3/4): f = (2/3, 1/3), P = (7/12, 5/12)
    assert state.aux_losses["moe_balance"].item() == pytest.approx(2 * (2 / 3 * 7 / 12 + 1 / 3 * 5 / 12))
    assert state.aux_losses["moe_z"].item() == pytest.approx(math.log(4) ** 2)  # logsumexp(ln 3, 0) = ln 4
    assert state.stats["moe/max_load"] == pytest.approx(4 / 3)
    assert state.stats["moe/dropped"] == 0


def test_switch_loss_is_one_for_uniform_routing():
    ln3 = math.log(3)
    block, x = router_case([[ln3, 0], [0, ln3]], top_k=1, aux_loss_coef=1.0)
    state = BlockState()
    block(x, state)
    assert state.aux_losses["moe_balance"].item() == pytest.approx(1.0)
    block, x = router_case([[0.0] * 4] * 3, top_k=2, aux_loss_coef=1.0, router="sigmoid")
    state = BlockState()
    block(x, state)
    assert state.aux_losses["moe_balance"].item() == pytest.approx(1.0)


def test_losses_only_in_training_and_when_asked():
    block, x = router_case([[1.0, 0], [0, 1.0]], top_k=1)
    state = BlockState()
    block.eval()(x, state)
    assert state.aux_losses == {} and "moe/max_load" in state.stats
    state = BlockState()
    block.train()
    block.balance = "bias"
    block(x, state)
    assert set(state.aux_losses) == {"moe_z"}
    block.z_loss_coef = 0.0
    state = BlockState()
    block(x, state)
    assert state.aux_losses == {}


def test_capacity_drops_and_counts():
    # 4 tokens, all to expert 0, capacity ceil(1.0 * 4 * 1 / 2) = 2: the last two tokens are dropped
    block, x = router_case([[2.0, 0]] * 4, top_k=1, capacity_factor=1.0)
    state = BlockState()
    y = block(x, state)
    assert state.stats["moe/dropped"] == pytest.approx(0.5)
    assert state.stats["moe/max_load"] == pytest.approx(2.0)
    assert y[0, :2].abs().sum() > 0 and y[0, 2:].abs().sum() == 0
    full = MoE(d_model=2, d_ff=4, n_experts=2, top_k=1).double()
    full.load_state_dict(block.state_dict())
    torch.testing.assert_close(y[0, :2], full(x, None)[0, :2], rtol=1e-10, atol=1e-12)


def test_capacity_serves_first_choices_first():
    # top-2 over 2 experts, 3 tokens: expert 0 gets 3 first choices + 0 second, capacity ceil(3*2/2) = 3
    block, x = router_case([[2.0, 0], [2.0, 0], [0, 2.0]], top_k=2, capacity_factor=1.0)
    state = BlockState()
    block(x, state)
    assert state.stats["moe/dropped"] == 0
    block, x = router_case([[2.0, 0], [2.0, 0], [0, 2.0]], top_k=2, capacity_factor=0.5)  # capacity 2
    state = BlockState()
    y = block(x, state)
    # expert 0 queue: t0, t1 (first choices), t2 (second) -> t2 dropped;
    # expert 1 queue: t2 (first choice), t0, t1 (second) -> t1 dropped
    assert state.stats["moe/dropped"] == pytest.approx(2 / 6)
    p = x[0].softmax(-1)  # top-2 of 2 experts: the renormalised gates are the probabilities
    e0 = naive_expert(x[0], block.w_in[0], block.w_out[0], "swiglu", 4)
    e1 = naive_expert(x[0], block.w_in[1], block.w_out[1], "swiglu", 4)
    expected = torch.stack([p[0, 0] * e0[0] + p[0, 1] * e1[0], p[1, 0] * e0[1], p[2, 1] * e1[2]])
    torch.testing.assert_close(y[0], expected, rtol=1e-10, atol=1e-12)


def test_stats_keep_the_worst_layer():
    state = BlockState()
    block, x = router_case([[2.0, 0]] * 4, top_k=1, capacity_factor=1.0)
    block(x, state)
    balanced, x2 = router_case([[2.0, 0], [0, 2.0]], top_k=1)
    balanced(x2, state)
    assert state.stats == {"moe/max_load": pytest.approx(2.0), "moe/dropped": pytest.approx(0.5)}


def test_bias_balancing_moves_load_off_the_busy_expert():
    block, x = router_case([[2.0, 0, 0]] * 4 + [[0, 1.0, 0]], top_k=1, balance="bias", bias_update_rate=0.1)
    block(x, None)
    assert block.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1])  # loads (4, 1, 0), mean 5/3
    block.eval()(x, None)
    assert block.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1])  # no updates outside training
    # the bias picks the expert, the gate stays the unbiased probability
    with torch.no_grad():
        block.expert_bias.copy_(torch.tensor([-1.0, 1.0, 0.0]))
    _, scores, chosen, gates, _ = block.route(x[0])
    assert chosen[:, 0].tolist() == [1, 1, 1, 1, 1]
    torch.testing.assert_close(gates[:, 0], scores[:, 1])


def test_records_and_last_load():
    seen = {}
    block = make(n_experts=4, top_k=2)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    block(x, BlockState(recorder=lambda name, t: seen.setdefault(name, t.detach().clone())))
    assert seen["router_logits"].shape == (6, 4) and seen["expert_load"].tolist() == block.last_load.tolist()
    # expert_in: every assignment's row grouped by expert, each expert's first choices before its second ones
    flat = x.reshape(6, 8)
    chosen = block.route(flat)[2]
    expected = [flat[t] for e in range(4) for slot in range(2) for t in range(6) if chosen[t, slot] == e]
    torch.testing.assert_close(seen["expert_in"], torch.stack(expected))
    assert int(block.last_load.sum()) == 12
    assert block.last_load.tolist() == [int((chosen == e).sum()) for e in range(4)]


def test_init_weights_scale():
    block = MoE(d_model=64, d_ff=256, n_experts=8, n_layers=8)
    assert block.w_in.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.w_out.std().item() == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(router="topk"), "router"),
    (dict(expert="relu"), "expert"),
    (dict(balance="loss"), "balance"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(kernel="triton"), "kernel"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoE(d_model=8, **kwargs)
    with pytest.raises(MicroArchError, match=message):
        build_block("moe", Dims(d_model=8), **kwargs)


def test_builds_from_registry_with_model_dims():
    block = build_block("moe", Dims(d_model=16, d_ff=32, n_layers=4, dropout=0.0), n_experts=4, top_k=1)
    assert isinstance(block, MoE) and block.hidden == 32 and block.n_layers == 4
    assert block(torch.randn(1, 3, 16), BlockState()).shape == (1, 3, 16)


# --- static dispatch, grouped matmul, fake tensors, compile, FLOPs ---------------------------------------

def dense_reference(block, x):
    """Every expert on every token, weighted by a dense (tokens, n_experts) gate matrix built from the
    routing by a Python loop that applies the capacity in priority order (first choices, then token order)."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ block.router.weight.t()
    scores = logits.softmax(-1) if block.router_kind == "softmax" else logits.sigmoid()
    top = (scores + block.expert_bias if block.balance == "bias" else scores).topk(block.top_k, -1).indices
    gates = scores.gather(-1, top)
    if block.top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    n_tokens = flat.shape[0]
    keep = torch.ones(n_tokens, block.top_k, dtype=torch.bool)
    if block.capacity_factor is not None:
        capacity = math.ceil(block.capacity_factor * n_tokens * block.top_k / block.n_experts)
        used = [0] * block.n_experts
        for slot in range(block.top_k):
            for t in range(n_tokens):
                e = int(top[t, slot])
                keep[t, slot] = used[e] < capacity
                used[e] += 1
    dense_gates = torch.zeros_like(scores).scatter_add(1, top, gates * keep)
    out = sum(dense_gates[:, e:e + 1] * naive_expert(flat, block.w_in[e], block.w_out[e], block.expert, block.hidden)
              for e in range(block.n_experts))
    return out.view(x.shape).to(x.dtype), 1 - keep.double().mean()


def grads(block, x, y):
    return torch.autograd.grad(y.pow(2).sum(), [x, block.router.weight, block.w_in, block.w_out])


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("kernel, dtype", [("loop", torch.float64), ("loop", torch.float32),
                                           ("grouped_mm", torch.float32)])
def test_kernels_match_dense_reference_outputs_and_gradients(kernel, dtype, capacity_factor):
    torch.manual_seed(0)
    block = MoE(d_model=16, d_ff=16, n_experts=4, top_k=2, capacity_factor=capacity_factor, kernel=kernel).to(dtype)
    torch.nn.init.normal_(block.router.weight, 0.0, 1.0)
    x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    state = BlockState()
    y = block(x, state)
    ref, dropped = dense_reference(block, x)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, ref, **tol)
    for got, want in zip(grads(block, x, y), grads(block, x, ref)):
        torch.testing.assert_close(got, want, **tol)
    assert float(state.stats["moe/dropped"]) == pytest.approx(float(dropped))
    assert (float(dropped) > 0) == (capacity_factor is not None)


def test_grouped_kernel_is_what_auto_picks_for_fp32_and_bf16():
    from micro_arch.blocks.grouped_mm import kernel_for

    x, w = torch.randn(10, 16), torch.randn(4, 16, 32)
    assert kernel_for(x, w) == "grouped_mm" and kernel_for(x.bfloat16(), w.bfloat16()) == "grouped_mm"
    assert kernel_for(x.double(), w.double()) == "loop"
    assert kernel_for(torch.randn(10, 6).bfloat16(), torch.randn(4, 6, 32).bfloat16()) == "loop"  # 12-byte rows


def test_bf16_autocast_grouped_matches_loop_and_fp32():
    torch.manual_seed(0)
    blocks = {k: MoE(d_model=16, d_ff=16, n_experts=4, top_k=2, kernel=k) for k in ("grouped_mm", "loop")}
    blocks["loop"].load_state_dict(blocks["grouped_mm"].state_dict())
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        y32 = blocks["loop"](x)
    results = {}
    for kernel, block in blocks.items():
        xg = x.clone().requires_grad_()
        seen = {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(xg, BlockState(recorder=lambda name, t, seen=seen: seen.setdefault(name, t.dtype)))
        assert y.dtype == torch.float32  # the block's output keeps its input's dtype
        assert seen == {"router_logits": torch.float32, "expert_load": torch.long, "expert_in": torch.bfloat16}
        results[kernel] = (y, *grads(block, xg, y))
        assert all(torch.isfinite(g).all() for g in results[kernel][1:])
        assert block.w_in.grad is None and results[kernel][3].dtype == torch.float32
    for a, b in zip(results["grouped_mm"], results["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)  # same bf16 products, summed in another order
    torch.testing.assert_close(results["grouped_mm"][0], y32, rtol=0.05, atol=0.01)  # bf16 rounding of ~2^-8


def test_stats_are_tensors_and_nothing_is_read_back(monkeypatch):
    block = MoE(d_model=16, d_ff=16, n_experts=4, top_k=2, capacity_factor=1.0, balance="bias").train()
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: pytest.fail(f"host read: Tensor.{_n}"))
    state = BlockState()
    block(torch.randn(2, 5, 16), state).sum().backward()  # the grouped kernel: the loop fallback reads offsets
    monkeypatch.undo()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in state.stats.values())


def moe_model(**moe_args):
    from micro_arch.config import LayerGroup, ModelConfig

    spec = "moe(" + ", ".join(f"{k}={v}" for k, v in moe_args.items()) + ")"
    cfg = ModelConfig(d_model=32, n_heads=2, vocab_size=40, max_seq_len=16,
                      defaults={"Norm": "layernorm", "Attn": "attention", "MLP": "swiglu", "MoE": spec},
                      layers=[LayerGroup(["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"], 1),
                              LayerGroup("Norm->MoE->+", 1)])
    return Model(cfg)


@pytest.mark.parametrize("moe_args", [dict(n_experts=4, top_k=2),
                                      dict(n_experts=4, top_k=2, capacity_factor=0.5, n_shared_experts=1),
                                      dict(n_experts=3, top_k=1, balance="bias", router="sigmoid")])
def test_model_trains_under_fake_tensors(moe_args):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        model = moe_model(**moe_args).train()
        idx = torch.randint(0, 40, (2, 16))
        for precision in (None, torch.bfloat16):
            with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
                out = model(idx, idx, state=BlockState())
            out.loss.backward()
        assert all(isinstance(p.grad, FakeTensor) for p in model.parameters())
        assert set(out.stats) == {"moe/max_load", "moe/dropped"}


def test_compiles_to_one_graph_in_bf16_and_matches_eager():
    """dynamo sees one graph; AOTAutograd (the part of torch.compile that traces the backward, here
    without Inductor's slow CPU code generation) runs forward and backward as eager does."""
    torch.manual_seed(0)
    model = moe_model(n_experts=4, top_k=2, capacity_factor=1.0, balance="bias").train()
    idx = torch.randint(0, 40, (2, 16))

    def step(idx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, idx, state=BlockState())
        return out.loss, out.stats

    explained = torch._dynamo.explain(step)(idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    bias = [m.expert_bias.clone() for m in model.modules() if isinstance(m, MoE)]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        for m, b in zip((m for m in model.modules() if isinstance(m, MoE)), bias):
            m.expert_bias.copy_(b)
        model.zero_grad()
        loss, stats = fn(idx)
        loss.backward()
        results.append((loss.detach(), stats, [p.grad.clone() for p in model.parameters()]))
    (loss_c, stats_c, grads_c), (loss_e, stats_e, grads_e) = results
    torch.testing.assert_close(loss_c, loss_e)
    assert stats_c.keys() == stats_e.keys() and all(torch.equal(stats_c[k], stats_e[k]) for k in stats_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def gathered_reference(block, x):
    """The same active matmuls as the block, token by token: each token's top_k experts' weights are
    gathered and applied with bmm, so FlopCounterMode counts them with torch's own bmm formula."""
    flat = x.reshape(-1, x.shape[-1])
    _, _, chosen, gates, _ = block.route(flat)
    rows = flat.repeat_interleave(block.top_k, 0).unsqueeze(1)  # (tokens * top_k, 1, d_model)
    experts = chosen.reshape(-1)
    h = torch.bmm(rows, block.w_in[experts])
    h = torch.cat([F.silu(h[..., :block.hidden]) * h[..., block.hidden:]], -1) if block.expert == "swiglu" else F.gelu(h)
    y = torch.bmm(h, block.w_out[experts]).view(flat.shape[0], block.top_k, -1)
    out = (y * gates.unsqueeze(-1)).sum(1)
    if block.shared is not None:
        out = out + block.shared(flat)
    return out.view(x.shape)


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=1, expert="gelu"), dict(n_shared_experts=2, capacity_factor=0.5)])
def test_flops_per_token_match_flop_counter(kwargs):
    """FlopCounterMode counts matmuls only (2 per multiply-add), as forward_flops_per_token does, so the
    counts agree exactly: on the real forward (the grouped op registers its own formula), on a bmm
    reference that runs the same active matmuls, and 3x forward for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    block = MoE(d_model=16, d_ff=24, n_experts=4, top_k=kwargs.pop("top_k", 2), **kwargs)
    x = torch.randn(2, 5, 16, requires_grad=True)
    per_token = block.forward_flops_per_token(seq_len=5)
    counts, outputs = {}, {}
    for name, fn in (("block", lambda: block(x, BlockState())), ("reference", lambda: gathered_reference(block, x))):
        with FlopCounterMode(display=False) as counter:
            outputs[name] = fn()
        counts[name] = counter.get_total_flops() / 10
        with FlopCounterMode(display=False) as counter:
            fn().square().sum().backward()
        counts[name + " fwd+bwd"] = counter.get_total_flops() / 10
    if block.capacity_factor is None:  # the reference knows no capacity; it runs the same matmuls all the same
        torch.testing.assert_close(outputs["block"], outputs["reference"], rtol=1e-5, atol=1e-6)
    assert counts == {"block": per_token, "reference": per_token,
                      "block fwd+bwd": 3 * per_token, "reference fwd+bwd": 3 * per_token}


def test_moe_experiment_counts_fewer_flops_than_the_dense_default():
    from micro_arch.experiment import load_experiment

    root = Path(__file__).resolve().parents[1] / "experiments"
    flops = {}
    for name in ("moe", "shakespeare-char"):
        cfg = load_experiment(root / name, ["model.vocab_size=65"])
        with torch.device("meta"):
            flops[name] = Model(cfg.model).flops_per_token(cfg.train.seq_len)
    assert flops["moe"] < flops["shakespeare-char"]


@pytest.mark.parametrize("capacity", [None, 3])
def test_dispatch_against_a_python_queue(capacity):
    from micro_arch.blocks.moe_dispatch import dispatch

    g = torch.Generator().manual_seed(0)
    n_tokens, top_k, n_experts = 9, 2, 4
    chosen = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    plan = dispatch(chosen, n_experts, capacity)
    queues = [[] for _ in range(n_experts)]  # (slot, token) in priority order
    for slot in range(top_k):
        for t in range(n_tokens):
            queues[int(chosen[t, slot])].append((slot, t))
    assert plan.tokens.tolist() == [t for q in queues for _, t in q]
    assert plan.counts.tolist() == [len(q) for q in queues]
    assert plan.offsets.dtype == torch.int32 and plan.offsets.tolist() == torch.tensor(
        [len(q) for q in queues]).cumsum(0).tolist()
    sorted_pairs = [p for q in queues for p in q]
    assert [sorted_pairs[i] for i in plan.inverse.tolist()] == [(s, t) for s in range(top_k) for t in range(n_tokens)]
    if capacity is None:
        assert plan.kept is None
    else:
        kept = {p for q in queues for p in q[:capacity]}
        assert plan.kept.tolist() == [[(s, t) in kept for t in range(n_tokens)] for s in range(top_k)]


def test_dispatch_shapes_do_not_depend_on_the_routing():
    from micro_arch.blocks.moe_dispatch import dispatch

    balanced = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    skewed = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    shapes = [{k: tuple(v.shape) for k, v in vars(dispatch(c, 4, 2)).items()} for c in (balanced, skewed)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_kernels_against_per_group_matmuls(dtype):
    """Both kernels against one matmul per group (an empty group included), outputs and gradients;
    the gradient of a plain sum() arrives expanded (stride 0), which the GEMM cannot take as it is."""
    from micro_arch.blocks.grouped_mm import grouped_mm

    torch.manual_seed(0)
    bounds = [0, 5, 5, 12, 20]
    offsets = torch.tensor(bounds[1:], dtype=torch.int32)
    x0, w0 = torch.randn(20, 16), torch.randn(4, 16, 24)
    results = {}
    for kernel in ("grouped_mm", "loop", "reference"):
        x, w = x0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        if kernel == "reference":
            y = torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
        else:
            y = grouped_mm(x, w, offsets, kernel)
        y.sum().backward()
        results[kernel] = (y, x.grad, w.grad)
    assert results["grouped_mm"][2][1].abs().sum() == 0  # the empty group's weight gets a zero gradient
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for kernel in ("grouped_mm", "loop"):
        for got, want in zip(results[kernel], results["reference"]):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, **tol)
