"""Peak memory of one training step, estimated without allocating it, and measured for real to check.

`estimate_memory` builds the model and optimizer under FakeTensorMode (tensors with shapes, dtypes
and devices but no storage) and runs two training steps exactly as the trainer does (forward under
autocast, backward, gradient clipping, optimizer step, zero_grad), under a MemTracker that adds up
the bytes of every tensor storage alive at each moment. Two steps, because the optimizer state only
exists from the first step on, and the steady state (state alive during forward and backward) is
what every later step sees. Blocks whose shapes depend on data (MoE routing counts, say) cannot run
on fake tensors: they get the analytic estimate instead, and `method` says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from micro_arch.config import ExperimentConfig
from micro_arch.device import autocast
from micro_arch.errors import MicroArchError
from micro_arch.state import BlockState

MiB = 2**20


@dataclass
class MemoryEstimate:
    peak_bytes: int
    breakdown: dict[str, int]  # parameters, gradients, optimizer, activations (logits, temporaries: the rest)
    method: str

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MiB

    def summary(self) -> str:
        parts = ", ".join(f"{_SHORT.get(k, k)} {v / MiB:.1f}" for k, v in self.breakdown.items())
        return f"{self.peak_mb:.1f} MiB ({parts}) by {self.method}"


_SHORT = {"parameters": "params", "gradients": "grads"}


def training_steps(model: nn.Module, optimizer, cfg: ExperimentConfig, device: torch.device, steps: int = 2):
    """What Trainer.train_step does to memory, on random tokens: grad_accum micro-batches of
    forward + backward, gradient clipping, optimizer step, zero_grad(set_to_none=True)."""
    t, vocab = cfg.train, cfg.model.vocab_size
    for _ in range(steps):
        loss_sum = torch.zeros((), device=device)
        for _ in range(t.grad_accum):
            x = torch.randint(0, vocab, (t.batch_size, t.seq_len), device=device)
            y = torch.randint(0, vocab, (t.batch_size, t.seq_len), device=device)
            with autocast(device, t.precision):
                out = model(x, y, state=BlockState())
            (out.loss / t.grad_accum).backward()
            loss_sum += out.ce_loss.detach()
            del out, x, y
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _build(cfg: ExperimentConfig, device: torch.device, fused: bool):
    from micro_arch.model import Model
    from micro_arch.optim import build_optimizer

    with torch.device(device):  # built in place: moving fake parameters fails, and the memory is the same
        model = Model(cfg.model)
    optimizer = build_optimizer(model, cfg.train, device)
    if not fused:
        for opt in optimizer.optimizers:
            for group in opt.param_groups:
                if "fused" in group:
                    group["fused"] = False
    return model, optimizer


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
        model, optimizer = _build(cfg, device, fused)
        tracker.track_external(model, *optimizer.optimizers)
        tracker._track_module_params_and_buffers(model, install_grad_hooks=True)  # label gradients
        with tracker:
            training_steps(model, optimizer, cfg, device)
        del model, optimizer
    snap = next(iter(tracker._peak_mem_snap.values()))
    by = {str(k.value if hasattr(k, "value") else k): v for k, v in snap.items()}
    peak = snap[total_key]
    breakdown = {"parameters": by.get("Parameter", 0) + by.get("Buffer", 0), "gradients": by.get("Gradient", 0),
                 "optimizer": by.get("Optstate", 0)}
    breakdown["activations"] = peak - sum(breakdown.values())
    return MemoryEstimate(peak, breakdown, "fake-tensor trace" if fake else "MemTracker on real tensors")


# --- the analytic cross-check -------------------------------------------------------------------


def analytic_estimate(cfg: ExperimentConfig, device: torch.device | None = None) -> MemoryEstimate:
    """Back-of-the-envelope: fp32 parameters, gradients and optimizer state (AdamW: 2 per parameter;
    Muon: 1 for hidden matrices) + activations saved for backward + the logits and their gradient.
    Saved activations are counted from the model's own Linear layers: each saves its input and,
    mostly, a nonlinearity or norm saves its output, so B*T*(in + out) elements per Linear, plus
    4 * d_model per layer for norms and residuals."""
    from micro_arch.model import Model

    with torch.device("meta"):
        model = Model(cfg.model)
    t = cfg.train
    dev = device or torch.device("cpu")
    half = t.precision == "bf16" or (t.precision == "auto" and dev.type == "cuda")
    act_bytes = 2 if half else 4
    params = {id(p): p for p in model.parameters()}.values()
    n_params = sum(p.numel() for p in params)
    if t.optimizer == "muon":
        embed_like = {id(model.embed.weight), id(model.head.weight)}
        muon = sum(p.numel() for p in params if p.dim() == 2 and id(p) not in embed_like)
        n_state = muon + 2 * (n_params - muon)
    else:
        n_state = 2 * n_params
    tokens = t.batch_size * t.seq_len
    saved = 0
    for layer in model.layers:
        saved += 4 * cfg.model.d_model
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                saved += m.in_features + m.out_features
    if model.final_norm is not None:
        saved += 2 * cfg.model.d_model
    vocab = cfg.model.vocab_size
    # logits (+ an fp32 copy under autocast) and log-softmax saved; in backward two fp32 gradients
    logits = tokens * vocab * (act_bytes + (4 if half else 0) + 4 + 4)
    activations = tokens * saved * act_bytes + logits
    weights, grads, state = 4 * n_params, 4 * n_params, 4 * n_state
    # forward/backward: weights, state, activations (gradients grow as activations are freed);
    # the optimizer step: weights, all gradients and state, plus a gradient-sized temporary
    peak = max(weights + state + activations + grads // 2, weights + grads + state + grads // 4)
    breakdown = {"parameters": weights, "gradients": grads, "optimizer": state}
    breakdown["activations"] = max(0, peak - sum(breakdown.values()))
    return MemoryEstimate(int(peak), breakdown, "analytic formula")


# --- the entry point ----------------------------------------------------------------------------


def estimate_memory(cfg: ExperimentConfig, device: torch.device) -> MemoryEstimate:
    """Peak bytes of one steady-state training step of `cfg` on `device`, without allocating them."""
    if cfg.model.vocab_size is None:
        raise MicroArchError("estimate_memory needs model.vocab_size; fill it from the tokenizer first")
    device = torch.device(device)
    cfg = replace(cfg, train=replace(cfg.train, compile=False))
    try:
        return _trace(cfg, device, fused=True)
    except MicroArchError:
        raise
    except Exception as fused_err:  # noqa: BLE001 - a fused kernel without a fake implementation
        first = f"{type(fused_err).__name__}: {str(fused_err).splitlines()[0] if str(fused_err) else ''}"
    try:
        est = _trace(cfg, device, fused=False)
        est.method += " (non-fused AdamW: the fused kernel would not run on fake tensors)"
        return est
    except MicroArchError:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. data-dependent shapes (MoE routing)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
        est = analytic_estimate(cfg, device)
        est.method += f" (the fake-tensor trace failed: {reason or first})"
        return est


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
        model, optimizer = _build(cfg, device, fused=True)
        training_steps(model, optimizer, cfg, device)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del model, optimizer
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, optimizer = _build(cfg, device, fused=True)
        training_steps(model, optimizer, cfg, device)
        del model, optimizer
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak

