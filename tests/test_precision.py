"""Every registered block and every shipped experiment trains and generates under bf16 autocast on CPU.

The cases come from the registry and from experiments/ when the tests are collected: a new block or a new
experiment folder gets these tests without writing one. Each case is a tiny model run twice from the same
init on the same batch, once in fp32 and once under bf16 autocast (what `precision: auto` means on a GPU).

Tolerances. bf16 keeps 8 significant bits: one rounding has a relative error of at most u = 2^-8 (0.39%).
At init the rounding errors are unbiased and independent, so n of them in series add in quadrature to about
sqrt(n) * u / sqrt(3) (the rms of a uniform error). The longest chain a logit goes through here is about 9
roundings (a block's two matmuls, each rounding its input, weight and output, then the LM head's three):
an expected normwise error of 1.7u. We allow LOGIT_TOL = 4u (1.6%), over twice that; the worst case 9u would
be too loose to see a block that computes in an 8-bit float (3 mantissa bits, u = 2^-4, 16x bf16's), which
test_tolerance_catches_a_block_computing_in_a_wrong_dtype shows the 4u bound does catch (its logits are 8u
off). The backward runs about two matmuls per forward matmul along the same depth, so gradients get twice
the allowance: GRAD_TOL = 8u. Measured at these sizes: logits 0.6-1.6u, gradients 0.7-1.9u. The loss
follows from the logits (loss_bound: a worst-case bound, loose at init where logits are small; the
logit and gradient checks are what catch a wrong dtype).
"""

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from test_registry import EXP_BLOCKS, PLUGIN
from torch import nn

from micro_arch.config import LayerGroup, ModelConfig
from micro_arch.eval.generate import generate
from micro_arch.experiment import load_experiment
from micro_arch.model import registry
from micro_arch.model.model import Model
from micro_arch.model.state import BlockState

ROOT = Path(__file__).resolve().parents[1]
U = 2.0 ** -8  # bf16's unit roundoff
LOGIT_TOL, GRAD_TOL = 4 * U, 8 * U
VOCAB, BATCH, SEQ = 48, 2, 24
TINY = ["model.d_model=32", "model.n_heads=4", "model.max_seq_len=32", f"model.vocab_size={VOCAB}",
        f"train.seq_len={SEQ}", f"train.batch_size={BATCH}"]


def _plugin_entries() -> dict:
    """The tests' own plug-in blocks, loaded the way an experiment's blocks.py is, then taken out of the
    global registry again so that other tests' listings do not see them; the fixture below puts them back."""
    registry.load_all()
    before = dict(registry._REGISTRY)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "precision_plugin"
        folder.mkdir()
        (folder / "blocks.py").write_text(EXP_BLOCKS + PLUGIN)
        registry.load_experiment_blocks(folder)
    added = {k: v for k, v in registry._REGISTRY.items() if k not in before}
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    return added


PLUGIN_ENTRIES = _plugin_entries()
BLOCKS = sorted([e.name for e in registry.list_blocks()] + list(PLUGIN_ENTRIES))
EXPERIMENTS = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/config.yaml"))
CASES = [f"block:{b}" for b in BLOCKS] + [f"experiment:{e}" for e in EXPERIMENTS]


@pytest.fixture(autouse=True)
def with_plugins(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {**registry._REGISTRY, **PLUGIN_ENTRIES})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation on a busy machine
    yield
    torch.set_num_threads(threads)


def block_model(name: str) -> Model:
    """Two layers of `Norm->name->+` (a norm block is the Norm role itself, around an MLP)."""
    is_norm = registry.get_entry(name).kind == "norm"
    cfg = ModelConfig(d_model=32, n_heads=4, vocab_size=VOCAB, max_seq_len=32,
                      defaults={"Norm": name if is_norm else "rmsnorm", "Attn": "attention", "MLP": "swiglu"},
                      layers=[LayerGroup("Norm->MLP->+" if is_norm else f"Norm->{name}->+", 2)])
    return Model(cfg)


def experiment_model(name: str) -> Model:
    """The experiment's own layer structure, every group repeated once, at width 32."""
    cfg = load_experiment(ROOT / "experiments" / name, TINY)
    for group in cfg.model.layers:
        group.repeat = 1
    return Model(cfg.model)


def build(case: str) -> Model:
    kind, name = case.split(":", 1)
    torch.manual_seed(0)
    return block_model(name) if kind == "block" else experiment_model(name)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def train_step(model: Model, bf16: bool):
    """Forward (under autocast if bf16), backward and one AdamW step on a copy, as the trainer does it."""
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(idx, targets)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0).step()
    unchanged = [n for n, p in model.named_parameters() if n in grads and grads[n].any() and torch.equal(p, before[n])]
    return out, grads, unchanged


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def loss_bound(out32, targets, tol: float) -> float:
    """How far the mean cross-entropy can move when the logits Z move by dZ with |dZ|_F <= tol |Z|_F:
    first order, dL = mean_t <p_t - y_t, dz_t> <= |P - Y|_F |dZ|_F / T (Cauchy-Schwarz); second order,
    logsumexp's Hessian has norm <= 1/2, adding <= |dZ|_F^2 / (4T)."""
    z = out32.logits.detach().float().flatten(0, 1)
    g = torch.softmax(z, -1) - nn.functional.one_hot(targets.flatten(), z.shape[-1])
    dz = tol * z.norm()
    return (g.norm() * dz + dz ** 2 / 4).item() / z.shape[0]


def precision_problems(model: Model) -> list[str]:
    """Everything wrong with training `model` one step under bf16 autocast, against fp32; [] when fine."""
    out32, g32, unchanged32 = train_step(model, bf16=False)
    out16, g16, unchanged16 = train_step(model, bf16=True)
    problems = []
    for tag, out, grads, unchanged in (("fp32", out32, g32, unchanged32), ("bf16", out16, g16, unchanged16)):
        if not torch.isfinite(out.loss):
            problems.append(f"{tag}: loss {out.loss.item()}")
        problems += [f"{tag}: gradient of {n} is not finite" for n, g in grads.items() if not torch.isfinite(g).all()]
        problems += [f"{tag}: the step left {n} unchanged" for n in unchanged]
        if not grads:
            problems.append(f"{tag}: no parameter got a gradient")
    if set(g32) != set(g16):
        problems.append(f"different parameters got gradients: {sorted(set(g32) ^ set(g16))}")
    if problems:
        return problems
    logit_err = rel(out16.logits, out32.logits)
    if logit_err > LOGIT_TOL:
        problems.append(f"logits differ by {logit_err / U:.1f}u > {LOGIT_TOL / U:.0f}u")
    names = sorted(g32)
    grad_err = rel(torch.cat([g16[n].flatten() for n in names]), torch.cat([g32[n].flatten() for n in names]))
    if grad_err > GRAD_TOL:
        problems.append(f"gradients differ by {grad_err / U:.1f}u > {GRAD_TOL / U:.0f}u")
    ce_err, bound = abs(out16.ce_loss.item() - out32.ce_loss.item()), loss_bound(out32, batch()[1], LOGIT_TOL)
    if ce_err > bound:
        problems.append(f"cross-entropy differs by {ce_err:.2e} > {bound:.2e}")
    return problems


@pytest.mark.parametrize("case", CASES)
def test_trains_one_step_under_bf16_like_fp32(case):
    assert precision_problems(build(case)) == []


@pytest.mark.parametrize("case", CASES)
def test_generates_with_the_cache_under_bf16(case):
    """Prefill then one token at a time through the KV/recurrent cache, all under bf16 autocast, gives the
    logits of one full forward (two bf16 computations of the same thing: twice the one-sided allowance)."""
    model = build(case).eval()
    idx = batch(1)[0][:, :20]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx).logits
        state = BlockState(cache={})
        steps = [model(idx[:, :8], state=state).logits]
        for t in range(8, idx.shape[1]):
            state.positions = torch.tensor([t])
            steps.append(model(idx[:, t:t + 1], state=state).logits)
        out = generate(model, idx[:, :4], max_new_tokens=6, temperature=0.0)
    assert torch.isfinite(full).all()
    assert rel(torch.cat(steps, 1), full) <= 2 * LOGIT_TOL
    assert out.shape == (BATCH, 10) and torch.equal(out[:, :4], idx[:, :4]) and out.max() < VOCAB


def test_every_block_and_experiment_is_a_case():
    assert {"mamba", "moe", "attention", "rmsnorm", "zz_exp_gate", "zz_plugin_block"} <= set(BLOCKS)
    assert {"mamba", "moe", "hybrid-mamba", "shakespeare-char"} <= set(EXPERIMENTS)


class _LowPrecision(nn.Module):
    """A linear map that, under autocast, rounds its output through `dtype`: a block computing in the wrong
    dtype without saying so. dtype=None is the same block without the fault."""

    dtype = None

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, state=None):
        y = self.proj(x)
        if self.dtype is not None and torch.is_autocast_enabled(y.device.type):
            y = y.to(self.dtype).to(y.dtype)
        return y


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_tolerance_catches_a_block_computing_in_a_wrong_dtype(dtype):
    faulty = type("Faulty", (_LowPrecision,), {"dtype": dtype})
    registry.register_block("zz_precision_faulty", kind="other")(faulty)
    registry.register_block("zz_precision_honest", kind="other")(_LowPrecision)
    torch.manual_seed(0)
    assert precision_problems(block_model("zz_precision_honest")) == []
    torch.manual_seed(0)
    problems = precision_problems(block_model("zz_precision_faulty"))
    assert any(p.startswith("logits differ") for p in problems), problems
