"""`micro-arch run`: train an experiment into a new run directory, or resume one exactly."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from micro_arch import checkpoint as ckpt
from micro_arch.config import ExperimentConfig, to_dict
from micro_arch.device import autocast, peak_memory_mb, resolve_device, set_threads
from micro_arch.distributed import Dist, init_distributed, launch, shutdown
from micro_arch.errors import MicroArchError
from micro_arch.experiment import load_experiment
from micro_arch.hf.init import PARENT_FILE, load_initial_weights
from micro_arch.metrics import MetricsLog
from micro_arch.model import Model
from micro_arch.optim import build_optimizer, lr_factor, set_lr
from micro_arch.rundir import SUMMARY_FORMAT_VERSION, new_run_dir, read_run_config, write_config, write_json

console = Console()


def planned_steps(cfg: ExperimentConfig, world_size: int) -> int:
    t = cfg.train
    if t.max_tokens is None:
        return t.max_steps
    return math.ceil(t.max_tokens / (t.batch_size * t.seq_len * t.grad_accum * world_size))


def tokens_per_step(cfg: ExperimentConfig, world_size: int) -> int:
    t = cfg.train
    return t.batch_size * t.seq_len * t.grad_accum * world_size


def check_resumable(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A run may be resumed with a longer budget or other cadences, never with another model or data."""
    old = to_dict(read_run_config(run_dir))
    new = to_dict(cfg)
    changeable = {"max_steps", "max_tokens", "eval_every", "log_every", "checkpoint_every", "sample",
                  "eval_batches", "compile", "device"}
    diffs = [f"{section}.{k}" for section in ("model", "data", "train") for k in new[section]
             if old[section].get(k) != new[section][k] and not (section == "train" and k in changeable)]
    if diffs:
        raise MicroArchError(f"{run_dir}: its config.yaml differs from this experiment in {', '.join(diffs)}; "
                             "resume with the run's own settings, or start a new run without --resume")


@torch.no_grad()
def held_out_loss(model, batches, device, precision) -> tuple[float, list[float]]:
    """Mean cross-entropy over fixed held-out batches, and the per-batch values (for noise estimates)."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, precision):
            losses.append(float(model(x.to(device), y.to(device)).ce_loss))
    model.train(was_training)
    return sum(losses) / len(losses), losses


class Trainer:
    def __init__(self, cfg: ExperimentConfig, data, dist: Dist, device: torch.device,
                 resume_payload: dict | None = None, on_eval=None):
        from micro_arch.data import eval_batches
        from micro_arch.data.batches import check_length

        self.cfg, self.data, self.run_dir, self.dist, self.device = cfg, data, None, dist, device
        self.resumed = resume_payload is not None
        t = cfg.train
        check_length(len(data.train), t.seq_len, "training split")
        torch.manual_seed(t.seed + dist.rank)
        self.model = Model(cfg.model).to(device)
        self.parent = None if resume_payload else load_initial_weights(self.model, cfg.model)
        self.optimizer = build_optimizer(self.model, t, device)
        self.total_steps = planned_steps(cfg, dist.world_size)
        self.step, self.tokens, self.elapsed, self.best_val = 0, 0, 0.0, float("inf")
        if resume_payload is not None:
            self.model.load_state_dict(resume_payload["model"])
            self.optimizer.load_state_dict(resume_payload["optimizer"])
            self.step, self.tokens = resume_payload["step"], resume_payload["tokens"]
            self.elapsed, self.best_val = resume_payload["elapsed_s"], resume_payload["best_val_loss"]
            ckpt.set_rng_state(resume_payload["rng"])
        self.forward_model = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            from micro_arch.registry import list_blocks

            sparse = {e.cls for e in list_blocks(kind="moe")}  # experts a batch never routes to get no grad
            self.forward_model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                     find_unused_parameters=any(type(m) in sparse for m in self.model.modules()))
        if t.compile:
            self.forward_model = torch.compile(self.forward_model)
        # The held-out windows are fixed by the global batch; each rank evaluates its rows of them,
        # so N processes evaluate exactly what one process with the global batch does.
        rows = slice(dist.rank * t.batch_size, (dist.rank + 1) * t.batch_size)
        self.val_batches = [(x[rows], y[rows]) for x, y in
                            eval_batches(data.val, t.batch_size * dist.world_size, t.seq_len, t.eval_batches)]
        self.last_val = resume_payload.get("last_val_loss") if resume_payload else None
        self.on_eval = on_eval  # on_eval(step, val_loss) after each evaluation (main rank); may raise to stop

    # --- one optimizer step ------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[torch.Tensor, dict, dict]:
        from micro_arch.data import sample_batch

        t, dist = self.cfg.train, self.dist
        set_lr(self.optimizer, lr_factor(step, t, self.total_steps))
        loss_sum = torch.zeros((), device=self.device)
        aux, stats = {}, {}
        for micro in range(t.grad_accum):
            x, y = sample_batch(self.data.train, t.batch_size, t.seq_len, t.seed, step * t.grad_accum + micro,
                                dist.rank, dist.world_size)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = self.forward_model.no_sync() if dist.enabled and micro < t.grad_accum - 1 else nullcontext()
            with sync:
                with autocast(self.device, t.precision):
                    out = self.forward_model(x, y)
                (out.loss / t.grad_accum).backward()
            loss_sum += out.ce_loss.detach()
            for k, v in out.aux_losses.items():
                aux[k] = aux.get(k, 0.0) + v.detach() / t.grad_accum
            stats.update(out.stats)
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / t.grad_accum, aux, stats

    # --- the loop --------------------------------------------------------------------------------

    def attach(self, run_dir: Path) -> None:
        """Write into `run_dir` from now on (created only once everything has been checked)."""
        self.run_dir = run_dir
        self.metrics = MetricsLog(run_dir / "metrics.csv", resume_step=self.step if self.resumed else None)
        if self.parent is not None and self.dist.main:
            write_json(run_dir / PARENT_FILE, self.parent)

    def train(self) -> None:
        t, dist = self.cfg.train, self.dist
        per_step = tokens_per_step(self.cfg, dist.world_size)
        self.model.train()
        self._write_summary("running")
        window_loss, window_steps, window_start = torch.zeros((), device=self.device), 0, time.perf_counter()
        run_start = time.perf_counter() - self.elapsed
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(elapsed_when_finished=True)]
        with Progress(*columns, console=console, disable=not dist.main, transient=False) as progress:
            task = progress.add_task(self.cfg.name, total=self.total_steps, completed=self.step, info="")
            while self.step < self.total_steps:
                loss, aux, stats = self.train_step(self.step)
                self.step += 1
                self.tokens += per_step
                window_loss += loss
                window_steps += 1
                progress.advance(task)
                last = self.step == self.total_steps
                row = None
                if self.step % t.log_every == 0 or last:
                    now = time.perf_counter()
                    train_loss = float(dist.mean(window_loss / window_steps))
                    tps = window_steps * per_step / (now - window_start)
                    row = {"step": self.step, "tokens": self.tokens, "train_loss": train_loss,
                           "lr": self.optimizer.param_groups[-1]["lr"], "tokens_per_sec": tps,
                           "memory_mb": peak_memory_mb(self.device), "elapsed_s": now - run_start}
                    row.update({f"aux/{k}": float(v) for k, v in aux.items()})
                    row.update({k: float(v) for k, v in stats.items()})
                    window_loss, window_steps = torch.zeros((), device=self.device), 0
                    info = f"loss {train_loss:.3f}  {tps:,.0f} tok/s"
                    if self.last_val is not None:
                        info += f"  val {self.last_val:.3f}"
                    progress.update(task, info=info)
                if self.step % t.eval_every == 0 or last:
                    val, _ = held_out_loss(self.model, self.val_batches, self.device, t.precision)
                    val = float(dist.mean(torch.tensor(val, device=self.device)))
                    self.last_val, self.best_val = val, min(self.best_val, val)
                    row = (row or {"step": self.step, "tokens": self.tokens}) | {"val_loss": val}
                    progress.update(task, info=(f"{progress.tasks[0].fields['info'].split('  val')[0]}"
                                                f"  val {val:.3f}"))
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if row is not None:
                    self.elapsed = time.perf_counter() - run_start
                    if dist.main:
                        self.metrics.log(row)
                    window_start = time.perf_counter() if "tokens_per_sec" in row else window_start
                    if self.on_eval is not None and dist.main and "val_loss" in row:
                        self.on_eval(self.step, row["val_loss"])
                if self.step % t.checkpoint_every == 0 or last:
                    self.elapsed = time.perf_counter() - run_start
                    self.save()
        self.elapsed = time.perf_counter() - run_start
        self._write_summary("completed")

    def save(self) -> None:
        if not self.dist.main:
            return
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed,
                   "best_val_loss": self.best_val, "data_step": self.step * self.cfg.train.grad_accum,
                   "rng": ckpt.rng_state(), "config": to_dict(self.cfg), "total_steps": self.total_steps,
                   "last_val_loss": self.last_val}
        directory = self.run_dir / "checkpoints"
        ckpt.save_checkpoint(directory / f"step_{self.step:07d}.pt", payload, also=ckpt.latest_checkpoint(self.run_dir))
        self._write_summary("running")

    def _write_summary(self, status: str) -> None:
        if not self.dist.main:
            return
        cfg, model = self.cfg, self.model
        write_json(self.run_dir / "summary.json", {
            "format_version": SUMMARY_FORMAT_VERSION, "experiment": cfg.name, "run_id": self.run_dir.name,
            "status": status,
            "params_total": model.num_params(), "params_non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": model.flops_per_token(cfg.train.seq_len), "steps": self.step,
            "tokens_seen": self.tokens, "wall_time_s": round(self.elapsed, 2),
            "tokens_per_sec": round(self.tokens / self.elapsed, 1) if self.elapsed else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "final_val_loss": self.last_val, "best_val_loss": None if self.best_val == float("inf") else self.best_val,
            "tokenizer": self.data.tokenizer.name, "vocab_size": cfg.model.vocab_size,
            "data_fingerprint": self.data.fingerprint, "world_size": self.dist.world_size,
            "device": str(self.device),
            "layers": [{"spec": g.spec, "repeat": g.repeat} for g in cfg.model.layers],
        })


# --- the command -------------------------------------------------------------------------------


def print_plan(cfg: ExperimentConfig, model: Model, world_size: int, device: torch.device) -> None:
    from rich.markup import escape

    from micro_arch.memory import estimate_memory

    steps = planned_steps(cfg, world_size)
    tokens = steps * tokens_per_step(cfg, world_size)
    n, n_ne = model.num_params(), model.num_params(non_embedding=True)
    flops = model.flops_per_token(cfg.train.seq_len)
    est = estimate_memory(cfg, device)
    console.print(f"[bold]{cfg.name}[/] (dry run)", soft_wrap=True)
    console.print(f"  parameters        {n:,} ({n_ne:,} without embeddings)", soft_wrap=True)
    console.print(f"  FLOPs per token   {flops:,.0f} (training: forward + backward)", soft_wrap=True)
    console.print(f"  planned           {steps:,} steps x {tokens_per_step(cfg, world_size):,} tokens = "
                  f"{tokens:,} tokens ({tokens / n_ne:.1f} tokens per non-embedding parameter), "
                  f"{flops * tokens:.3g} FLOPs", soft_wrap=True)
    console.print(f"  peak memory       {est.summary()}", soft_wrap=True)
    if est.warning:  # the fake-tensor trace failed: say so, never fall back silently
        console.print(f"  [bold yellow]warning[/]: {escape(est.warning)}", soft_wrap=True)


def _cli_args(target, overrides, resume, runs_root, checkpoint=None) -> list[str]:
    args = ["run", str(target), "--runs-dir", str(runs_root)]
    if overrides:
        args += ["--set", *overrides]
    if resume:
        args += ["--resume", str(resume)]
    if checkpoint:
        args += ["--checkpoint", str(checkpoint)]
    return args


def run_experiment(target, overrides=None, resume=None, dry_run=False, runs_root="runs", nproc=1,
                   on_eval=None, checkpoint=None) -> Path | None:
    """Train `target` (an experiment folder); returns the run directory (None on non-main ranks).
    `on_eval(step, val_loss)` is called after each held-out evaluation (single process only; sweeps
    use it to prune); an exception it raises stops training and propagates."""
    overrides = list(overrides or [])
    if nproc > 1 and "RANK" not in os.environ and not dry_run:
        code = launch(nproc, _cli_args(target, overrides, resume, runs_root, checkpoint))
        if code:
            raise MicroArchError(f"distributed training with {nproc} processes failed (exit code {code})")
        return None
    from micro_arch.data import prepare_data

    cfg = load_experiment(target, overrides)
    set_threads()
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device.type)
    try:
        if not dist.main:
            dist.barrier()  # let rank 0 fill the data cache first
        data = prepare_data(cfg.data)
        if dist.main:
            dist.barrier()
        tok_vocab = data.tokenizer.vocab_size
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = tok_vocab
        elif cfg.model.vocab_size < tok_vocab:
            raise MicroArchError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                 f"{tok_vocab}; remove model.vocab_size to take the tokenizer's")
        if dry_run:
            if dist.main:
                with torch.device("meta"):  # sizes only: a 7B model must not allocate its weights
                    model = Model(cfg.model)
                print_plan(cfg, model, dist.world_size, device)
            return None
        payload = None
        if resume:
            payload = _load_resume_state(Path(resume), cfg, checkpoint, dist, device)
            if payload["step"] >= planned_steps(cfg, dist.world_size):
                if dist.main:
                    _say_complete(Path(resume), target, overrides, payload, cfg, dist.world_size)
                return Path(resume) if dist.main else None
        elif checkpoint:
            raise MicroArchError(f"--checkpoint {checkpoint} picks the checkpoint of a run to resume; "
                                 "add --resume RUN_DIR")
        # Everything that can fail on bad input (model, optimizer, data lengths, a forward pass for the
        # trace) runs before a new run directory exists, so a failed start leaves nothing behind.
        trainer = Trainer(cfg, data, dist, device, payload, on_eval=on_eval)
        trace = _trace(trainer.model, cfg, device) if dist.main and not resume else None
        run_dir = Path(resume) if resume else (new_run_dir(runs_root, cfg.name) if dist.main else None)
        run_dir = Path(dist.broadcast(str(run_dir)))
        with _removed_on_failure(run_dir, fresh=not resume and dist.main, trainer=trainer):
            trainer.attach(run_dir)
            if dist.main:
                _announce(cfg, trainer, run_dir, resume)
                if not resume:
                    write_config(run_dir, cfg)
                    data.tokenizer.save(run_dir)
                    (run_dir / "trace.txt").write_text(trace)
            trainer.train()
        if dist.main:
            _finish(cfg, trainer, run_dir, data.tokenizer)
        return run_dir if dist.main else None
    finally:
        shutdown()


def _load_resume_state(run_dir: Path, cfg: ExperimentConfig, checkpoint, dist: Dist, device) -> dict:
    """The checkpoint to resume from, after removing half-written files and warning about damaged ones."""
    check_resumable(run_dir, cfg)
    if dist.main:
        for path in ckpt.remove_partial_saves(run_dir):
            warn(f"removed {path}, left by a process stopped in the middle of a save")
    dist.barrier()
    payload, path, skipped = ckpt.load_for_resume(run_dir, checkpoint, map_location=device)
    if skipped and dist.main:
        warn(f"{run_dir}: skipped {', '.join(skipped)}; resuming from {path.name} (step {payload['step']}), "
             "the newest intact checkpoint")
    return payload


def _say_complete(run_dir: Path, target, overrides, payload, cfg, world_size) -> None:
    steps = planned_steps(cfg, world_size)
    more = shlex.join(["micro-arch", "run", str(target), "--resume", str(run_dir), "--set",
                       *[o for o in overrides if not o.startswith("train.max_steps=")],
                       f"train.max_steps={2 * max(payload['step'], 1)}"])
    console.print(f"{run_dir}: this run is complete ({payload['step']:,} of {steps:,} steps); nothing to do, "
                  f"nothing changed. To train it further, resume with a larger train.max_steps, e.g.\n  {more}",
                  soft_wrap=True, highlight=False)


@contextmanager
def _removed_on_failure(run_dir: Path, fresh: bool, trainer):
    """A new run directory that fails before its first step or checkpoint is removed again; one that holds
    checkpoints is never removed (it can be resumed)."""
    try:
        yield
    except BaseException:
        if fresh and trainer.step == 0 and not ckpt.has_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _trace(model, cfg, device) -> str:
    from micro_arch.trace import render, trace_model, trace_text

    idx = torch.zeros(1, cfg.train.seq_len, dtype=torch.long, device=device)
    return trace_text(render(trace_model(model, idx)))


def _announce(cfg, trainer, run_dir, resume) -> None:
    m = trainer.model
    verb = f"resuming at step {trainer.step}" if resume else "training"
    console.print(f"[bold]{cfg.name}[/]: {verb} {m.num_params():,} parameters "
                  f"({m.num_params(non_embedding=True):,} without embeddings) for {trainer.total_steps:,} steps "
                  f"on {trainer.device} x{trainer.dist.world_size} -> {run_dir}")


def _finish(cfg, trainer, run_dir: Path, tokenizer) -> None:
    from micro_arch.generate import sample_texts

    s = cfg.train.sample
    texts = sample_texts(trainer.model, tokenizer, s.prompts, max_new_tokens=s.max_new_tokens,
                         temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=cfg.train.seed)
    write_json(run_dir / "samples.json", [{"prompt": p, "text": t} for p, t in zip(s.prompts, texts)])
    console.print(f"held-out loss {trainer.last_val:.4f} after {trainer.step:,} steps, "
                  f"{trainer.tokens:,} tokens, {trainer.elapsed:.1f} s")
    for prompt, text in zip(s.prompts, texts):
        console.rule(f"sample: {prompt!r}")
        console.print(prompt + text, highlight=False, markup=False)
    console.print(f"run directory: {run_dir}")
