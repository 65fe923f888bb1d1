"""estimate_memory against the real peak of a training step on this CPU: synthetic sizes, every shipped
experiment in fp32 and bf16, a 7B shape, and the analytic fallback (which must say so and err high); and
that the estimate traces the trainer's own step, with each stage's loss and batches."""

import functools
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

import micro_arch.blocks  # noqa: F401
import micro_arch.memory as memory
from micro_arch.config import ExperimentConfig, LayerGroup, ModelConfig, TrainConfig
from micro_arch.experiment import load_experiment
from micro_arch.memory import ANALYTIC, TRACE, analytic_estimate, estimate_memory, measure_memory
from micro_arch.model.model import Model
from micro_arch.stages import stage_of
from micro_arch.stages.dpo_data import Pairs
from micro_arch.stages.setup import StageData
from micro_arch.stages.sft_data import Examples
from micro_arch.train.prefetch import TokenWindows
from micro_arch.train.step import TrainStep, lm_loss

CPU = torch.device("cpu")
DENSE = "Norm->Attn->+->Norm->MLP->+"
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
EXPERIMENTS = sorted(p.name for p in EXPERIMENTS_DIR.iterdir() if (p / "config.yaml").is_file())
# Tiny sizes: the trace's cost is per operation, so fewer time steps (Mamba's scan loops) keep it fast.
TINY = ["model.vocab_size=96", "model.d_model=32", "train.batch_size=2", "train.seq_len=24",
        "model.max_seq_len=24"]


# One thread: on a shared 2-core machine idle intra-op threads spin, 10-40x more CPU time here
# (bench/memory_estimate.py measures with the default threads).
pytestmark = pytest.mark.usefixtures("one_thread")


def config(d=64, layers=2, batch=8, seq=64, vocab=65, spec=DENSE, heads=4, **train) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(d_model=d, n_heads=heads, vocab_size=vocab, max_seq_len=seq, layers=[LayerGroup(spec, layers)]),
        train=TrainConfig(batch_size=batch, seq_len=seq, precision="fp32", **train))


def experiment(name: str, precision: str) -> ExperimentConfig:
    return load_experiment(EXPERIMENTS_DIR / name, TINY + [f"train.precision={precision}"])


@functools.cache
def measured_peak(name: str, precision: str) -> int:
    return measure_memory(experiment(name, precision), CPU)


def force_fallback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("data-dependent shape")

    monkeypatch.setattr(memory, "_trace", broken)


# The measured side: CPU has no allocator statistics and RSS mixes in the Python heap and glibc's caching,
# and MemTracker on real tensors would only see what the estimate's own mechanism (the dispatcher) sees.
# measure_memory records the CPU allocator's own allocation and free events through the profiler, so
# kernel workspaces that never pass the dispatcher count too: an independent, byte-exact reference.
@pytest.mark.parametrize("cfg", [
    config(),
    config(d=128, layers=4, batch=12, seq=64),
    config(d=256, layers=2, batch=4, seq=256),
    config(d=96, layers=3, batch=16, seq=128, vocab=512),
    config(d=128, layers=2, batch=4, seq=128, optimizer="muon", grad_accum=2),
], ids=["d64-L2-b8-t64", "d128-L4-b12-t64", "d256-L2-b4-t256", "d96-L3-b16-t128-v512", "muon-accum2"])
def test_estimate_within_10_percent_of_measured_peak(cfg):
    est = estimate_memory(cfg, CPU)
    measured = measure_memory(cfg, CPU)
    assert est.method == TRACE and est.warning is None
    assert abs(est.peak_bytes / measured - 1) < 0.10, (est.summary(), measured / 2**20)
    assert sum(est.breakdown.values()) == est.peak_bytes
    analytic = analytic_estimate(cfg, CPU).peak_bytes
    assert measured <= analytic < 2.5 * measured  # the fallback errs high, within reason


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_is_traced_within_10_percent(name, precision):
    est = estimate_memory(experiment(name, precision), CPU)
    assert est.method == TRACE and est.fallback_reason is None, est.warning
    measured = measured_peak(name, precision)
    assert abs(est.peak_bytes / measured - 1) < 0.10, (est.summary(), measured / 2**20)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_fallback_says_so_and_errs_high(name, precision, monkeypatch):
    force_fallback(monkeypatch)
    est = estimate_memory(experiment(name, precision), CPU)
    assert est.method == ANALYTIC
    assert est.fallback_reason == "RuntimeError: data-dependent shape"
    assert "not the fake-tensor trace" in est.warning and "data-dependent shape" in est.warning
    assert "safety margin" in est.summary()
    measured = measured_peak(name, precision)
    assert measured <= est.peak_bytes < 2.5 * measured, (est.summary(), measured / 2**20)


def test_dpo_counts_its_reference_and_both_rows_of_each_pair():
    """A DPO step runs a chosen and a rejected row per pair through the policy, after the frozen reference's
    forward: as much activation memory as an SFT step of twice the batch, plus the reference's weights (less the
    log-probabilities that a batch carries when they were computed ahead)."""
    def peak(name, *overrides):
        return estimate_memory(load_experiment(EXPERIMENTS_DIR / name, TINY + list(overrides)), CPU).peak_bytes

    reference = Model(experiment("shakespeare-dpo", "fp32").model)
    weights = sum(t.numel() * t.element_size() for t in [*reference.parameters(), *reference.buffers()])
    dpo = peak("shakespeare-dpo", "train.batch_size=2")
    precomputed = peak("shakespeare-dpo", "train.batch_size=2", "train.dpo_precompute_reference=true")
    sft = peak("shakespeare-sft", "train.batch_size=4")
    logps_ahead = 2 * 2 * 4  # the batch's reference log-probabilities: two rows per pair, fp32
    assert dpo - precomputed == weights - logps_ahead
    assert precomputed == pytest.approx(sft, rel=0.01)


def trainer_pieces(cfg: ExperimentConfig) -> tuple:
    """(loss_fn, one batch) as the trainer gets them for cfg, on random tokens: pretraining's lm_loss and
    token windows, or the loss and batch source of the stage's own Stage (every target is learned, so no
    batch is trimmed; DPO's reference is random weights, as model.init_from is unset)."""
    t, vocab = cfg.train, cfg.model.vocab_size
    if t.stage == "pretrain":
        return lm_loss, TokenWindows(np.random.randint(0, vocab, 10 * t.seq_len).astype(np.uint16), t).batch(0)
    rows = functools.partial(torch.randint, 0, vocab, (3 * t.batch_size, t.seq_len))
    split = Examples(rows(), rows()) if t.stage == "sft" else Pairs(rows(), rows(), rows(), rows())
    pieces = stage_of(cfg).pieces(cfg, StageData(None, split, split, ""), CPU)
    return pieces.loss_fn, pieces.source.batch(0)


def layout(batch: tuple) -> list:
    return [(v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v) for v in batch]


@pytest.mark.parametrize("name, overrides", [
    ("shakespeare-char", []),
    ("shakespeare-sft", []),
    ("shakespeare-dpo", []),
    ("shakespeare-dpo", ["train.dpo_precompute_reference=true"]),
], ids=["pretrain", "sft", "dpo", "dpo-precomputed"])
def test_the_estimate_runs_the_trainers_step_with_the_stages_loss_and_batches(name, overrides, monkeypatch):
    """The trace goes through train_step.TrainStep itself, twice, with the loss the stage hands the trainer
    (the same function; DPO's a closure of the same code) and grad_accum batches laid out as the stage's
    batch source lays them out."""
    cfg = load_experiment(EXPERIMENTS_DIR / name, TINY + ["train.grad_accum=2", *overrides])
    loss_fn, batch = trainer_pieces(cfg)
    calls = []
    run_step = TrainStep.__call__

    def spy(self, step, batches):
        calls.append((step, self.loss_fn, [layout(b) for b in batches]))
        return run_step(self, step, batches)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    assert estimate_memory(cfg, CPU).method == TRACE
    assert [step for step, _, _ in calls] == [0, 1]
    for _, traced_loss, batches in calls:
        assert traced_loss.__code__ is loss_fn.__code__
        assert batches == [layout(batch)] * 2


def test_memory_the_trainers_step_keeps_shows_in_the_estimate(monkeypatch):
    """A step that holds 1 MiB more (say a new buffer in TrainStep) is estimated 1 MiB higher, as it is
    measured: the estimate cannot miss a change to the trainer's step."""
    cfg = config(d=32, layers=1, batch=2, seq=16)
    before = estimate_memory(cfg, CPU).peak_bytes, measure_memory(cfg, CPU)
    run_step = TrainStep.__call__

    def step_holding_a_buffer(self, step, batches):
        buffer = torch.empty(2**20, dtype=torch.uint8, device=self.device)
        metrics = run_step(self, step, batches)
        del buffer
        return metrics

    monkeypatch.setattr(TrainStep, "__call__", step_holding_a_buffer)
    after = estimate_memory(cfg, CPU).peak_bytes, measure_memory(cfg, CPU)
    assert after[0] - before[0] == 2**20
    assert after[1] - before[1] == 2**20


def test_summary_line():
    est = estimate_memory(config(), CPU)
    line = est.summary()
    assert line.startswith(f"{est.peak_bytes / 2**20:.1f} MiB (params ")
    assert "grads" in line and "optimizer" in line and "activations" in line and line.endswith("by fake-tensor trace")


def test_7b_estimate_is_sensible():
    # how long it takes is measured by bench/memory_estimate.py --7b, not asserted here
    cfg = config(d=4096, layers=32, heads=32, batch=1, seq=2048, vocab=32000)
    cfg.model.tie_embeddings = False
    est = estimate_memory(cfg, CPU)
    assert est.method == TRACE
    # Llama-2-7B's shape with SwiGLU width 10944 (8/3 * 4096 rounded up to 32; Llama has 11008)
    n = 32 * (4 * 4096**2 + 3 * 4096 * 10944 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    assert n == 6_713_249_792
    assert est.breakdown["parameters"] >= 4 * n
    # fp32 AdamW: weights, gradients and two moments alive together at the optimizer step: 16 bytes each
    assert 16 * n <= est.peak_bytes < 16 * n * 1.15
    assert 0 <= est.breakdown["optimizer"] - 8 * n < 4096  # two moments, and a step counter per tensor


def test_dry_run_warns_when_the_trace_fails(monkeypatch, capsys):
    from micro_arch.commands.run import run_experiment

    force_fallback(monkeypatch)
    run_experiment(EXPERIMENTS_DIR / "shakespeare-char", TINY, dry_run=True)
    out = " ".join(capsys.readouterr().out.split())
    assert "by analytic formula" in out
    assert "warning: memory estimate by the analytic formula" in out and "data-dependent shape" in out


def test_sweep_warns_before_pruning(monkeypatch, capsys, tmp_path):
    from micro_arch.sweep.study import run_sweep

    force_fallback(monkeypatch)
    sweep = {"experiment": str(EXPERIMENTS_DIR / "shakespeare-char"), "n_trials": 1, "memory_budget_mb": 0.01,
             "top_k": 0, "set": TINY, "search_space": {"model.d_model": {"type": "categorical", "choices": [32]}}}
    path = tmp_path / "warn.yaml"
    path.write_text(yaml.safe_dump(sweep))
    run_sweep(path, runs_root=tmp_path / "runs")
    out = " ".join(capsys.readouterr().out.split())
    assert out.index("warning: memory estimate by the analytic formula") < out.index("pruned before training")
    study = optuna.load_study(study_name="warn", storage=f"sqlite:///{tmp_path / 'runs/sweeps/warn/study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "data-dependent shape" in trial.user_attrs["memory_warning"]
    assert trial.user_attrs["memory_method"] == ANALYTIC
