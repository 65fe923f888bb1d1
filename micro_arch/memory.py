"""Peak memory of one training step, estimated without allocating it, and measured for real to check.

`estimate_memory` builds the model and optimizer under FakeTensorMode (tensors with shapes, dtypes
and devices but no storage) and runs two steps of the trainer's own train_step.TrainStep (forward
under autocast, the stage's loss with the auxiliary losses, backward, gradient clipping, optimizer
step, zero_grad) with the stage's loss function, on random batches of the shape the stage's batch
source yields, under a MemTracker that adds up the bytes of every tensor storage alive at each
moment. So a change to the step is in the estimate without touching this file. Two steps, because
the optimizer state only exists from the first step on, and the steady state (state alive during
forward and backward) is what every later step sees. Every built-in block traces (static shapes, no
host reads). A block that cannot run on fake tensors gets the analytic formula instead, which
guesses high; the estimate then says so: `method` is "analytic formula" and `fallback_reason` holds
the trace's error, and the sweep and the dry run print `warning`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from micro_arch.config import ExperimentConfig
from micro_arch.errors import MicroArchError
from micro_arch.stages import stage_of
from micro_arch.train.step import TrainStep

MiB = 2**20


TRACE, ANALYTIC = "fake-tensor trace", "analytic formula"


@dataclass
class MemoryEstimate:
    peak_bytes: int
    breakdown: dict[str, int]  # parameters, gradients, optimizer, activations (logits, temporaries: the rest)
    method: str  # TRACE or ANALYTIC
    fallback_reason: str | None = None  # why the trace could not run, when method is ANALYTIC
    note: str = ""  # how the method was applied (non-fused AdamW, the analytic margin)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MiB

    @property
    def warning(self) -> str | None:
        """One line for the user when the estimate is not the trace's, else None."""
        if self.method == TRACE:
            return None
        return (f"memory estimate by the {self.method} ({self.note}), not the fake-tensor trace, which failed: "
                f"{self.fallback_reason}. It is meant to err high; a block with data-dependent shapes "
                "(.tolist(), nonzero, bincount) is the usual cause")

    def summary(self) -> str:
        parts = ", ".join(f"{_SHORT.get(k, k)} {v / MiB:.1f}" for k, v in self.breakdown.items())
        how = f"{self.method} ({self.note})" if self.note else self.method
        return f"{self.peak_mb:.1f} MiB ({parts}) by {how}"


_SHORT = {"parameters": "params", "gradients": "grads"}


def synthetic_batch(cfg: ExperimentConfig, device: torch.device) -> tuple:
    """Random tokens in the form the stage's batch source yields, at full width (a stage's source trims
    a batch after its last learned position; every target here is learned, the widest case):
    pretraining (x, y); SFT (x, y, scale); DPO (x, y, reference log-probabilities or None), with a
    chosen and a rejected row per pair."""
    return stage_of(cfg).synthetic_batch(cfg, device)


def training_steps(model: nn.Module, optimizer, cfg: ExperimentConfig, device: torch.device, steps: int = 2,
                   reference: nn.Module | None = None) -> None:
    """`steps` steps of the trainer's own TrainStep (one process, not compiled) with the stage's loss,
    each on grad_accum random micro-batches prepared ahead, as the trainer's prefetcher does."""
    step = TrainStep(model, model, optimizer, cfg.train, device, distributed=False, total_steps=steps,
                     loss_fn=stage_of(cfg).loss_fn(cfg.train, reference))
    for index in range(steps):
        step(index, [synthetic_batch(cfg, device) for _ in range(cfg.train.grad_accum)])


def _build(cfg: ExperimentConfig, device: torch.device, fused: bool):
    from micro_arch.model.model import Model
    from micro_arch.train.optim import build_optimizer

    with torch.device(device):  # built in place: moving fake parameters fails, and the memory is the same
        model = Model(cfg.model)
    optimizer = build_optimizer(model, cfg.train, device)
    if not fused:
        for opt in optimizer.optimizers:
            for group in opt.param_groups:
                if "fused" in group:
                    group["fused"] = False
    reference = None  # DPO's frozen copy of the starting weights, unless its log-probs were computed ahead
    if stage_of(cfg).keeps_reference(cfg.train):
        with torch.device(device):
            reference = Model(cfg.model).eval().requires_grad_(False)
    return model, optimizer, reference


# --- the fake-tensor trace ----------------------------------------------------------------------


def _peak_tracker():
    """A MemTracker that keeps only the global peak: its per-module snapshots cost O(modules) per
    operation, which makes a 7B model take half a minute instead of a few seconds."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

        def _pre_bw_hook(self, module, args) -> None:
            pass

        def _post_bw_hook(self, module, args) -> None:
            pass

    return PeakTracker(), _TOTAL_KEY


def _trace(cfg: ExperimentConfig, device: torch.device, fused: bool, fake: bool = True) -> MemoryEstimate:
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker, total_key = _peak_tracker()
    with FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext():
        model, optimizer, reference = _build(cfg, device, fused)
        tracker.track_external(model, *optimizer.optimizers, *([reference] if reference is not None else []))
        tracker._track_module_params_and_buffers(model, install_grad_hooks=True)  # label gradients
        with tracker:
            training_steps(model, optimizer, cfg, device, reference=reference)
        del model, optimizer, reference
    snap = next(iter(tracker._peak_mem_snap.values()))
    by = {str(k.value if hasattr(k, "value") else k): v for k, v in snap.items()}
    peak = snap[total_key]
    breakdown = {"parameters": by.get("Parameter", 0) + by.get("Buffer", 0), "gradients": by.get("Gradient", 0),
                 "optimizer": by.get("Optstate", 0)}
    breakdown["activations"] = peak - sum(breakdown.values())
    return MemoryEstimate(peak, breakdown, TRACE if fake else "MemTracker on real tensors")


# --- the analytic fallback ----------------------------------------------------------------------

# The formula below guesses what blocks save for backward from their parameters' shapes; real blocks
# also keep copies (RoPE'd q and k, SwiGLU's silu(gate), an MoE's gathered rows, autocast casts) that
# no shape reveals. With this margin on the guessed activations, every built-in block came out 1.13x
# to 1.7x of the fake-tensor trace over a grid of sizes (fp32 and bf16; more for long Mamba sequences,
# whose scan works on 64 steps at a time): a guess that errs high, never low.
ACTIVATION_MARGIN = 1.5


def _saved_elements_per_token(model: nn.Module, cfg: ExperimentConfig) -> tuple[int, int, int]:
    """(elements in the activation dtype, elements always in fp32) saved for backward per token, and
    the largest fp32 temporary per token of any one block.

    - nn.Linear and convolutions: their input and output (a nonlinearity or norm mostly saves one of them).
    - n-D parameter stacks (E, a, b) owned by a block (MoE experts): batched matmuls saving a + b per row,
      for `top_k` rows per token if the block says how many experts a token visits, else for all E
      (the worst case: every token through every slice).
    - other 2-D parameters owned by a block (a raw matmul weight; Mamba's A, (d_inner, d_state)):
      as a Linear, their two dimensions per token, in fp32 (Mamba's scan saves its inputs in fp32); and,
      as a temporary of one block at a time, 6 states of that size per token (a scan's decays and
      states and their gradients, as if the whole sequence were materialised at once).
    - norms and residuals: d_model per block of every branch, in fp32."""
    matmul = fp32 = temporary = 0
    d = cfg.model.d_model
    skip = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
    modules = [m for layer in model.layers for m in layer.modules()]
    if model.final_norm is not None:
        modules += list(model.final_norm.modules())
    for m in modules:
        if isinstance(m, nn.Linear):
            matmul += m.in_features + m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            matmul += m.in_channels + m.out_channels
        if hasattr(m, "blocks") and isinstance(m.blocks, nn.ModuleList):
            fp32 += d * len(m.blocks)
        if isinstance(m, skip):
            continue
        for p in m.parameters(recurse=False):
            if p.dim() >= 3:
                rows = getattr(m, "top_k", None) or p.shape[0]
                matmul += rows * (p.shape[-2] + p.shape[-1])
            elif p.dim() == 2:
                fp32 += p.shape[0] + p.shape[1]
                temporary = max(temporary, 6 * p.numel())
    return matmul, fp32, temporary


def analytic_estimate(cfg: ExperimentConfig, device: torch.device | None = None) -> MemoryEstimate:
    """What the estimate falls back to when the fake-tensor trace cannot run: fp32 parameters, gradients
    and optimizer state (AdamW: 2 per parameter; Muon: 1 for hidden matrices), the activations saved for
    backward as `_saved_elements_per_token` guesses them times ACTIVATION_MARGIN, and the logits with their
    fp32 copies and gradient (DPO: two rows per pair, and the frozen reference's weights). Everything is
    taken as alive at once (no credit for gradients growing while activations are freed): an upper bound,
    not a prediction."""
    from micro_arch.model.model import Model

    with torch.device("meta"):
        model = Model(cfg.model)
    t = cfg.train
    dev = torch.device(device) if device is not None else torch.device("cpu")
    half = t.precision == "bf16" or (t.precision == "auto" and dev.type == "cuda")
    act_bytes = 2 if half else 4
    params = list({id(p): p for p in model.parameters()}.values())
    n_params = sum(p.numel() for p in params)
    if t.optimizer == "muon":
        embed_like = {id(model.embed.weight), id(model.head.weight)}
        muon = sum(p.numel() for p in params if p.dim() == 2 and id(p) not in embed_like)
        n_state = muon + 2 * (n_params - muon)
    else:
        n_state = 2 * n_params
    tokens = t.batch_size * t.seq_len * stage_of(cfg).rows_per_example  # DPO: chosen and rejected rows
    matmul, fp32, temporary = _saved_elements_per_token(model, cfg)
    saved = tokens * (matmul * act_bytes + fp32 * 4 + temporary * 4)
    # logits (+ an fp32 copy under autocast), log-softmax saved, and their fp32 gradient
    logits = tokens * cfg.model.vocab_size * (act_bytes + (4 if half else 0) + 4 + 4)
    activations = int(ACTIVATION_MARGIN * saved) + logits
    weights, grads, state = 4 * n_params, 4 * n_params, 4 * n_state
    if stage_of(cfg).keeps_reference(t):
        weights *= 2  # the frozen reference's copy
    # the optimizer step may need a gradient-sized temporary (non-fused AdamW, Muon's iterations)
    peak = weights + grads + state + max(activations, grads)
    breakdown = {"parameters": weights, "gradients": grads, "optimizer": state,
                 "activations": peak - weights - grads - state}
    note = f"saved activations guessed from parameter shapes, x{ACTIVATION_MARGIN:g} safety margin"
    return MemoryEstimate(int(peak), breakdown, ANALYTIC, note=note)


# --- the entry point ----------------------------------------------------------------------------


def estimate_memory(cfg: ExperimentConfig, device: torch.device) -> MemoryEstimate:
    """Peak bytes of one steady-state training step of `cfg` on `device`, without allocating them.
    Never falls back silently: an estimate that is not the trace's says why in `fallback_reason`."""
    if cfg.model.vocab_size is None:
        raise MicroArchError("estimate_memory needs model.vocab_size; fill it from the tokenizer first")
    device = torch.device(device)
    cfg = replace(cfg, train=replace(cfg.train, compile=False))
    with _quiet_fake_tensor_log():
        try:
            return _trace(cfg, device, fused=True)
        except MicroArchError:
            raise
        except Exception as fused_err:  # noqa: BLE001 - a fused kernel without a fake implementation
            first = _one_line(fused_err)
        try:
            est = _trace(cfg, device, fused=False)
            est.note = "non-fused AdamW: the fused kernel would not run on fake tensors; same memory"
            return est
        except MicroArchError:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. a block with data-dependent shapes
            reason = _one_line(err) or first
    est = analytic_estimate(cfg, device)
    est.fallback_reason = reason
    return est


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    """FakeTensorMode logs a full traceback for every op that fails under it; the failure is reported
    once, in the estimate itself."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- the real thing, to check against -----------------------------------------------------------


def measure_memory(cfg: ExperimentConfig, device: torch.device) -> int:
    """Peak bytes of two real training steps (model and optimizer built inside the measurement).

    On a GPU: torch.cuda.max_memory_allocated. On a CPU there are no allocator statistics, and RSS
    mixes in the Python heap and glibc's caching, so we record every CPU allocation and free with
    the profiler's memory events (reported by c10's CPU allocator itself, so kernels' internal
    workspaces count too, unlike anything seen through the dispatcher) and take the running maximum."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        model, optimizer, reference = _build(cfg, device, fused=True)
        training_steps(model, optimizer, cfg, device, reference=reference)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del model, optimizer, reference
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, optimizer, reference = _build(cfg, device, fused=True)
        training_steps(model, optimizer, cfg, device, reference=reference)
        del model, optimizer, reference
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak

