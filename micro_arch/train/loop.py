"""The training loop: the step, the batches and the bookkeeping, put together.

    pieces = stage_of(cfg).pieces(cfg, data, device, rank, world_size)   # micro_arch.stages
    trainer = Trainer(cfg, data, dist, device, payload, pieces=pieces)   # builds and checks; writes nothing
    trainer.train(run_dir, resume_command)                  # the loop; raises RunInterrupted on Ctrl-C
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from micro_arch import checkpoint as ckpt
from micro_arch.config import ExperimentConfig, to_dict
from micro_arch.hf.init import load_initial_weights
from micro_arch.model.model import Model
from micro_arch.train.bookkeeping import Bookkeeper, RunState
from micro_arch.train.distributed import Dist
from micro_arch.train.divergence import RunDiverged
from micro_arch.train.optim import build_optimizer
from micro_arch.train.prefetch import Prefetcher
from micro_arch.train.step import StagePieces, TrainStep
from micro_arch.train.stop import RunInterrupted, StopRequests


def planned_steps(cfg: ExperimentConfig, world_size: int) -> int:
    """max_steps, or the steps a token or FLOP budget buys (rounded up: a run never trains less than asked)."""
    t = cfg.train
    tokens = t.max_tokens if t.max_tokens is not None else t.budget_tokens
    if t.budget_flops is not None:
        return max(1, math.ceil(t.budget_flops / (training_flops_per_token(cfg) * tokens_per_step(cfg, world_size))))
    if tokens is None:
        return t.max_steps
    return max(1, math.ceil(tokens / tokens_per_step(cfg, world_size)))


def training_flops_per_token(cfg: ExperimentConfig) -> float:
    """The model's training FLOPs per token (Model.flops_per_token), from a model on the meta device."""
    from micro_arch.errors import MicroArchError

    if cfg.model.vocab_size is None:
        raise MicroArchError("train.budget_flops: the model's FLOPs need model.vocab_size, which the tokenizer "
                             "sets once the data is prepared")
    with torch.device("meta"):
        return Model(cfg.model).flops_per_token(cfg.train.seq_len)


def tokens_per_step(cfg: ExperimentConfig, world_size: int) -> int:
    t = cfg.train
    return t.batch_size * t.seq_len * t.grad_accum * world_size


def tokens_in(batches: list, world_size: int) -> int:
    """Input positions of one step, from the shapes (no device read): batch x seq_len when pretraining; a
    stage's batches are trimmed to their longest row (DPO's hold chosen and rejected rows), so fewer. Under
    DDP this rank's count stands for every rank's."""
    return sum(b[0].numel() for b in batches) * world_size


def wrap_model(model, cfg: ExperimentConfig, dist: Dist, device: torch.device):
    """What the step calls: the model, under DDP when distributed, compiled when asked."""
    forward = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from micro_arch.model.registry import list_blocks

        # An MoE block may leave experts that no token chose without a gradient, unless it says that
        # every parameter always gets one (the built-in MoE: empty groups get zeros); searching for
        # unused parameters costs a graph walk per step, so only where needed.
        sparse = {e.cls for e in list_blocks(kind="moe")}
        unused = any(type(m) in sparse and not getattr(m, "every_param_gets_grad", False) for m in model.modules())
        forward = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=unused)
    if cfg.train.compile:
        mode = cfg.train.compile_mode
        forward = torch.compile(forward, mode=None if mode == "default" else mode)
    return forward


class Trainer:
    """Model, optimizer, the stage's pieces and the loop. The caller passes the stage's StagePieces (built before
    the run directory exists, so that bad input leaves nothing behind)."""

    def __init__(self, cfg: ExperimentConfig, data, dist: Dist, device: torch.device,
                 resume_payload: dict | None = None, on_eval=None, *, pieces: StagePieces):
        t = cfg.train
        self.cfg, self.data, self.dist, self.device, self.on_eval = cfg, data, dist, device, on_eval
        self.config_dict = to_dict(cfg)
        self.resumed = resume_payload is not None
        self.total_steps = planned_steps(cfg, dist.world_size)
        self.pieces = pieces
        self.batches = Prefetcher(self.pieces.source, t.grad_accum, device)
        torch.manual_seed(t.seed + dist.rank)
        self.model = Model(cfg.model).to(device)
        # model.init_from (not on resume: the checkpoint has the weights); parent.json is written with the run
        self.parent = None if self.resumed else load_initial_weights(self.model, cfg.model)
        self.optimizer = build_optimizer(self.model, t, device)
        self.state = RunState()
        if resume_payload is not None:
            ckpt.load_weights(self.model, resume_payload["model"], "the checkpoint to resume from")
            self.optimizer.load_state_dict(resume_payload["optimizer"])
            self.state = RunState.from_payload(resume_payload)
            ckpt.set_rng_state(resume_payload["rng"])
        self.step_fn = TrainStep(self.model, wrap_model(self.model, cfg, dist, device), self.optimizer, t, device,
                                 dist.enabled, self.total_steps, self.pieces.loss_fn)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def last_val(self) -> float | None:
        return self.state.last_val

    @property
    def elapsed(self) -> float:
        return self.state.times["wall"]

    def train(self, run_dir: Path, resume_command: str | None = None) -> None:
        state, log_every = self.state, self.cfg.train.log_every
        self.model.train()
        with StopRequests(self.dist, self.device) as stop, Bookkeeper(self, run_dir, resume_command) as books:
            try:
                while state.step < self.total_steps:
                    batches = self.batches.take(state.step)
                    per_step = tokens_in(batches, self.dist.world_size)
                    metrics = self.step_fn(state.step, batches)
                    state.step += 1
                    state.tokens += per_step
                    if state.step < self.total_steps:
                        self.batches.prepare(state.step)  # while the device works on this step
                    books.after_step(metrics, per_step)
                    signum = stop.requested(state.step, log_every)
                    if signum and state.step < self.total_steps:
                        books.interrupted()
                        raise RunInterrupted(signum, f"interrupted at step {state.step}")
            except RunInterrupted:
                raise
            except RunDiverged as err:
                books.record_divergence(err)
                self.dist.barrier()  # every rank stops here; none exits (and has torchrun stop rank 0) before it wrote
                raise
            except BaseException as err:
                books.write_summary("stopped", error=f"{type(err).__name__}: {err}")
                raise
            books.write_summary("completed")
