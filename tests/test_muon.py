"""Muon: Newton-Schulz against the SVD, batched against per-parameter, DDP-sharded against one process,
exact resume, and which parameters it takes."""

import copy
import math
import shutil

import pytest
import torch
from helpers import ROOT, read_metrics, run_on_one_and_two_processes, run_torchrun
from muon_shard_worker import grads_for, mixed_params, three_muon_steps

from micro_arch.commands.run import run_experiment
from micro_arch.config import TrainConfig
from micro_arch.errors import MicroArchError
from micro_arch.experiment import load_experiment
from micro_arch.model.model import Model
from micro_arch.train.muon import (
    NS_BAND,
    NS_COEFFICIENTS,
    NS_FLOOR,
    NS_STEPS,
    Muon,
    newton_schulz,
    update_scale,
)
from micro_arch.train.optim import build_optimizer


def quintic_power(s: torch.Tensor, steps: int = NS_STEPS, coefficients=NS_COEFFICIENTS) -> torch.Tensor:
    for k in range(steps):
        a, b, c = coefficients[min(k, len(coefficients) - 1)]
        s = a * s + b * s**3 + c * s**5
    return s


def test_the_documented_band_holds_and_is_as_tight_as_five_fixed_quintic_steps():
    x = torch.logspace(math.log10(NS_FLOOR), 0, 200_001, dtype=torch.float64)
    y = quintic_power(x)
    assert NS_BAND[0] <= y.min() and y.max() <= NS_BAND[1]
    assert y.min() < NS_BAND[0] + 0.01 and y.max() > NS_BAND[1] - 0.01  # and the band is tight
    jordan = [(3.4445, -4.7750, 2.0315)]
    worst = (y - 1).abs().max()
    assert worst <= (quintic_power(x, 5, jordan) - 1).abs().max() + 0.02 < (quintic_power(x, 4, jordan) - 1).abs().max()
    assert (quintic_power(x, 7) - 1).abs().max() < 0.02  # steps past the table (its last entry again) stay near 1


def test_each_step_is_the_minimax_quintic_on_the_interval_before_it():
    """Chebyshev's alternation theorem: p (3 coefficients) is the best approximation of 1 in the max norm on
    [l, u] iff the error reaches its maximum 4 times with alternating signs. Each table entry is p(x / 1.01)
    for that p, and [l, u] is the image of [NS_FLOOR, 1] under the steps before it."""
    x = torch.logspace(math.log10(NS_FLOOR), 0, 100_001, dtype=torch.float64)
    for k, (a, b, c) in enumerate(NS_COEFFICIENTS):
        lo, hi = quintic_power(x, k).aminmax()
        y = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
        z = 1.01 * y
        err = 1 - (a * z + b * z**3 + c * z**5)
        inner = torch.nonzero((err[1:-1] - err[:-2]) * (err[2:] - err[1:-1]) <= 0).flatten() + 1
        extrema = err[torch.cat([torch.tensor([0]), inner, torch.tensor([len(err) - 1])])]
        big = extrema[extrema.abs() > 0.999 * err.abs().max()]
        signs = torch.sign(big)
        assert (signs[1:] != signs[:-1]).sum() >= 3, f"step {k}: error peaks {big.tolist()}"

@pytest.mark.parametrize("shape", [(3, 48, 20), (20, 48), (2, 16, 16)], ids=["tall-batched", "wide", "square"])
def test_newton_schulz_maps_singular_values_through_the_quintic(shape):
    """NS(G) = U q(S / |G|_F) V^T exactly (q the NS_STEPS quintics composed); so its singular values lie in the band
    and it is within the band's width of the polar factor U V^T."""
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    s_normalised = s / (torch.linalg.matrix_norm(g).unsqueeze(-1) + 1e-7)  # as newton_schulz normalises
    assert s_normalised.min() > NS_FLOOR  # random Gaussian matrices are well conditioned
    expected = u @ torch.diag_embed(quintic_power(s_normalised)) @ vh
    out = newton_schulz(g, dtype=torch.float64)
    assert out.dtype == torch.float64 and out.shape == g.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    sv = torch.linalg.svdvals(out)
    assert NS_BAND[0] <= sv.min() and sv.max() <= NS_BAND[1]
    polar_gap = torch.linalg.matrix_norm(out - u @ vh, ord=2).max()
    assert polar_gap <= max(1 - NS_BAND[0], NS_BAND[1] - 1)
    # fp32 agrees with fp64; bf16 (the GPU default) stays near the band. Its round-off in the first, steep
    # steps moves the smallest singular values most (to 0.49-0.54 on these matrices; 0.66 on 704 x 128)
    torch.testing.assert_close(newton_schulz(g.float()).double(), expected, rtol=0, atol=2e-5)
    sv16 = torch.linalg.svdvals(newton_schulz(g.float(), dtype=torch.bfloat16).double())
    assert NS_BAND[0] - 0.2 <= sv16.min() and sv16.max() <= NS_BAND[1] + 0.05


@pytest.mark.parametrize("shape", [(704, 128), (128, 352)], ids=["tall", "wide"])
def test_bf16_iteration_stays_bounded_on_rank_deficient_updates(shape):
    """Gradients are often of low rank. Iterating on Gram matrices (cheaper for wide X) squares the
    condition number; run for too many steps in bf16 it blows the singular values up (to 60-200 here, seen
    with all five steps in Gram form). Paired steps must stay in the band like the plain iteration."""
    torch.manual_seed(0)
    g = torch.randn(4, shape[0], 4) @ torch.randn(4, 4, shape[1]) + 1e-4 * torch.randn(4, *shape)
    sv = torch.linalg.svdvals(newton_schulz(g, dtype=torch.bfloat16).double())
    assert sv.max() <= NS_BAND[1] + 0.1
    assert sv[:, :4].min() >= NS_BAND[0] - 0.1  # the rank-4 part is orthogonalised as in exact arithmetic


def naive_muon_step(params, grads, bufs, lr, momentum, wd):
    """One Muon step written out per parameter, Nesterov momentum as in the reference."""
    for p, g, buf in zip(params, grads, bufs):
        buf.mul_(momentum).add_(g, alpha=1 - momentum)
        direction = g + momentum * (buf - g)
        update = newton_schulz(direction)  # one 2-D matrix: no batching
        p.mul_(1 - lr * wd).sub_(lr * 0.2 * math.sqrt(max(p.shape)) * update)


def test_batched_update_equals_the_per_parameter_one():
    params = mixed_params()
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = Muon(params, lr=0.01, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32)
    for step in range(3):
        grads = grads_for(step, params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        naive_muon_step(ref, grads, bufs, lr=0.01, momentum=0.9, wd=0.1)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    assert update_scale(torch.Size([24, 8])) == pytest.approx(0.2 * math.sqrt(24))


def test_momentum_follows_each_parameter_when_some_have_no_gradient_and_after_a_reload():
    """The buffers of same-shaped parameters live in one stack: a step where one of them has no gradient
    (its momentum must not move), and a load_state_dict mid-run, must not mix them up."""
    params = mixed_params()
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = Muon(params, lr=0.01, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32)
    saved = None
    for step in range(6):
        grads = grads_for(step, params)
        live = [i for i in range(len(params)) if not (step in (1, 2) and i in (0, 4))]  # (24, 8) and (16, 16)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g.clone() if i in live else None
        if step == 4:  # the state saved after step 3, loaded into the same optimizer
            opt.load_state_dict(saved)
        opt.step()
        saved = copy.deepcopy(opt.state_dict())
        naive_muon_step([ref[i] for i in live], [grads[i] for i in live], [bufs[i] for i in live],
                        lr=0.01, momentum=0.9, wd=0.1)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
        for i, p in enumerate(params):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[i], rtol=1e-6, atol=1e-7)


def test_ddp_sharded_orthogonalisation_equals_one_process(tmp_path):
    params = three_muon_steps()
    result = run_torchrun(ROOT / "tests" / "muon_shard_worker.py", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for p, q in zip(params, result["params"]):
            torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
        # shapes (24, 8) x3, (8, 24), (16, 16) x2, (5, 7): each rank takes half of each stack, rounded up
        assert result["orthogonalised"] == 3 * (2 + 1 + 1 + 1)  # one process: 3 * 7


def test_muon_run_on_two_processes_equals_one_process(tmp_path, tiny_experiment):
    """End to end through `micro-arch run --nproc 2`: the same parameters as one process with the global batch."""
    exp = tiny_experiment()
    common = ["train.optimizer=muon", "train.muon_ns_dtype=fp32", "train.max_steps=6", "train.log_every=2",
              "train.eval_every=6", "train.checkpoint_every=6"]
    one, two = run_on_one_and_two_processes(exp, tmp_path, common)
    sa = torch.load(one / "checkpoints/latest.pt", weights_only=True)["model"]
    sb = torch.load(two / "checkpoints/latest.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)


def test_resume_of_a_muon_run_is_exact(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    overrides = ["train.optimizer=muon"]
    full = run_experiment(exp, runs_root=tmp_path / "runs", overrides=overrides)
    stopped = tmp_path / "stopped"  # what a run killed after its step-12 checkpoint leaves
    shutil.copytree(full, stopped)
    shutil.copy(stopped / "checkpoints/step_0000012.pt", stopped / "checkpoints/latest.pt")
    (stopped / "checkpoints/step_0000024.pt").unlink()
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=overrides, resume=stopped)
    keys = ("step", "tokens", "train_loss", "val_loss", "lr")
    assert [[r[k] for k in keys] for r in read_metrics(stopped)] == [[r[k] for k in keys] for r in read_metrics(full)]
    a = torch.load(full / "checkpoints/latest.pt", weights_only=True)
    b = torch.load(stopped / "checkpoints/latest.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    muon_a, muon_b = a["optimizer"]["optimizers"][0], b["optimizer"]["optimizers"][0]
    assert muon_a["state"].keys() == muon_b["state"].keys() and muon_a["state"]
    for i in muon_a["state"]:
        assert torch.equal(muon_a["state"][i]["momentum_buffer"], muon_b["state"][i]["momentum_buffer"])


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    cfg = load_experiment("experiments/moe", ["model.d_model=32", "model.n_heads=2", "model.layers.0.repeat=1",
                                              "train.optimizer=muon"])
    cfg.model.vocab_size = 65
    model = Model(cfg.model)
    muon, adam = build_optimizer(model, cfg.train, torch.device("cpu")).optimizers
    name = {id(p): n for n, p in model.named_parameters()}
    to_muon = {name[id(p)] for g in muon.param_groups for p in g["params"]}
    to_adam = {name[id(p)] for g in adam.param_groups for p in g["params"]}
    assert to_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight"}
    assert to_adam == set(name.values()) - to_muon  # embeddings (= tied head), norms, 3-D expert stacks
    assert any(model.get_parameter(n).dim() == 3 for n in to_adam)
    assert isinstance(muon, Muon) and muon.param_groups[0]["lr"] == cfg.train.muon_lr


def test_bad_muon_settings_are_refused():
    with pytest.raises(ValueError, match="2-D parameters only"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], momentum=1.0)
    from micro_arch.config import from_dict

    with pytest.raises(MicroArchError, match="train.muon_lr: must be positive"):
        from_dict(TrainConfig, {"muon_lr": 0.0}, where="train")
    with pytest.raises(MicroArchError, match="train.muon_ns_dtype"):
        from_dict(TrainConfig, {"muon_ns_dtype": "fp16"}, where="train")
