"""Everything around the training step: where the time goes, the log window, metrics.csv, the progress
bar, held-out evaluation, checkpoints and summary.json, at the cadences of the train config."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from micro_arch import checkpoint as ckpt
from micro_arch.device import peak_memory_mb
from micro_arch.rundir import SUMMARY_FORMAT_VERSION, group_id, write_json
from micro_arch.train.divergence import FiniteWatch, RunDiverged, diverged_message, finite, weights_finite
from micro_arch.train.metrics import MetricsLog

console = Console()
TIMES = ("wall", "train", "compile", "eval", "checkpoint")
HEARTBEAT_S = 10.0  # summary.json's updated_at is refreshed at least this often (at log steps)


@dataclass
class RunState:
    """What a checkpoint carries besides the model, optimizer and RNG: enough to continue bit-for-bit."""
    step: int = 0
    tokens: int = 0
    best_val: float = float("inf")
    last_val: float | None = None
    times: dict = field(default_factory=lambda: dict.fromkeys(TIMES, 0.0))
    timed_tokens: int = 0  # tokens of the steps counted in times["train"] (throughput's numerator)
    window: dict = field(default_factory=dict)  # the log window so far: metric sums and steps

    @classmethod
    def from_payload(cls, p: dict) -> RunState:
        times = {**dict.fromkeys(TIMES, 0.0), **p.get("times", {"wall": p.get("elapsed_s", 0.0)})}
        return cls(p["step"], p["tokens"], p["best_val_loss"], p.get("last_val_loss"), times,
                   p.get("timed_tokens", 0), p.get("window", {}))

    def payload(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "best_val_loss": self.best_val,
                "last_val_loss": self.last_val, "elapsed_s": self.times["wall"], "times": dict(self.times),
                "timed_tokens": self.timed_tokens, "window": self.window}


class Clock:
    """Charges the time since its last reading to one account. On CUDA it first waits for the device (the
    steps run asynchronously), so it is read only at log, evaluation and checkpoint steps."""

    def __init__(self, device: torch.device, times: dict):
        self.device, self.times = device, times
        self._wall0, self._t0 = times["wall"], time.perf_counter()
        self._mark = self._t0

    def charge(self, account: str | None) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        spent, self._mark = now - self._mark, now
        if account is not None:
            self.times[account] += spent
        self.times["wall"] = self._wall0 + now - self._t0
        return spent


class Window:
    """Step metrics summed on the device since the last log row; read on the host once per row."""

    def __init__(self, state: dict):
        self.sums: dict = state.get("sums", {})
        self.steps: int = state.get("steps", 0)

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():  # a copy of the first: a CUDA graph's outputs are overwritten by its next run
            self.sums[k] = self.sums[k] + v if k in self.sums else (v.clone() if torch.is_tensor(v) else v)
        self.steps += 1

    def read(self, dist, device) -> dict[str, float]:
        """Means over the window (and over ranks), then empty."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=device) for k in keys])
        values = dist.mean(values / self.steps).tolist()
        self.sums, self.steps = {}, 0
        return dict(zip(keys, values))

    def state(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}


class Bookkeeper:
    def __init__(self, trainer, run_dir, resume_command: str | None = None):
        self.t, self.run_dir, self.resume_command = trainer, run_dir, resume_command
        self.cfg, self.dist, self.state = trainer.cfg.train, trainer.dist, trainer.state
        self.clock = Clock(trainer.device, self.state.times)
        self.window = Window(self.state.window)
        self.metrics = MetricsLog(run_dir / "metrics.csv", resume_step=self.state.step if trainer.resumed else None)
        self.first_step = True  # the first step of a process is timed apart: compilation, warm-up
        self.window_tokens, self.window_time = 0, 0.0
        self.saved_step, self.last_summary = None, 0.0
        self.watch = FiniteWatch(trainer.device, self.dist)
        self.kept_step = self.state.step if trainer.resumed else None  # the newest checkpoint on disk
        self.loads: list[float] = []  # the machine's 1-minute load average at each summary of this process
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(elapsed_when_finished=True)]
        self.progress = Progress(*columns, console=console, disable=not self.dist.main, auto_refresh=False)
        self.task = self.progress.add_task(trainer.cfg.name, total=trainer.total_steps, completed=self.state.step,
                                           info="")
        self.info = ""

    def __enter__(self):
        self.progress.start()
        self.write_summary("running")
        self.clock.charge(None)
        return self

    def __exit__(self, *exc):
        self.progress.refresh()
        self.progress.stop()
        return False

    # --- after every step ----------------------------------------------------------------------

    def after_step(self, metrics: dict, step_tokens: int) -> None:
        s, cfg, last = self.state.step, self.cfg, self.state.step == self.t.total_steps
        self.window.add(metrics)
        if self.first_step:
            self.clock.charge("compile")
            self.first_step = False
        else:
            self.window_tokens += step_tokens
        self.watch.add(s, metrics.get("train_loss"), getattr(self.t.step_fn, "grad_norm", None))
        row = None
        if s % cfg.log_every == 0 or last:
            row = self._log_row()
        if row is not None or s % cfg.eval_every == 0 or s % cfg.checkpoint_every == 0:
            self._stop_if_diverged(row)  # where the host reads the device anyway
        if s % cfg.eval_every == 0 or last:
            row = (row or {"step": s, "tokens": self.state.tokens}) | self._evaluate()
            if not finite(row["val_loss"]):
                self._stop_if_diverged(row, s, "the held-out loss")
        if row is not None:
            if self.dist.main:
                self.metrics.log(row)
            self.clock.charge(None)
            if self.t.on_eval is not None and self.dist.main and "val_loss" in row:
                self.t.on_eval(s, row["val_loss"])
        if s % cfg.checkpoint_every == 0 or last:
            self.save()
        elif row is not None and time.monotonic() - self.last_summary > HEARTBEAT_S:
            self.write_summary("running")

    def _stop_if_diverged(self, row: dict | None, first: int | None = None, what: str = "") -> None:
        """Raise RunDiverged when a step's loss or gradient norm was not finite (the row is logged first)."""
        if first is None:
            first = self.watch.first_bad_step()
            if first is None:
                return
            what = "the training loss or the gradient norm"
        if row is not None and self.dist.main:
            self.metrics.log(row)
        raise self.diverged(first, what)

    def diverged(self, first: int | None, what: str) -> RunDiverged:
        s = self.state.step
        kept = f"checkpoints/step_{self.kept_step:07d}.pt (step {self.kept_step:,})" if self.kept_step is not None else None
        message = diverged_message(self.t.cfg, self.t.device, first, s, what, not self.t.resumed, kept,
                                   self.run_dir)
        return RunDiverged(message, first if first is not None else s, s)

    def record_divergence(self, err: RunDiverged) -> None:
        """summary.json says 'diverged', when, and which checkpoint is the last finite one."""
        self.progress.stop()
        self.write_summary("diverged", diverged_at_step=err.first_step, error=str(err),
                           last_finite_checkpoint=None if self.kept_step is None else
                           f"checkpoints/step_{self.kept_step:07d}.pt")

    def _log_row(self) -> dict:
        self.window_time += self.clock.charge("train")
        self.state.timed_tokens += self.window_tokens
        # a window holding only a process's first step (timed as compilation) has no throughput, not 0
        tps = self.window_tokens / self.window_time if self.window_tokens and self.window_time > 0 else None
        means = self.window.read(self.dist, self.t.device)
        row = {"step": self.state.step, "tokens": self.state.tokens, "train_loss": means.pop("train_loss", None),
               "lr": self.t.optimizer.param_groups[-1]["lr"], "tokens_per_sec": tps,
               "memory_mb": peak_memory_mb(self.t.device), "elapsed_s": self.state.times["wall"], **means}
        self.window_tokens, self.window_time = 0, 0.0
        self.info = f"loss {row['train_loss']:.3f}" + (f"  {tps:,.0f} tok/s" if tps else "")
        self._show()
        return row

    def _show(self) -> None:
        val = f"  val {self.state.last_val:.3f}" if self.state.last_val is not None else ""
        self.progress.update(self.task, completed=self.state.step, info=self.info + val)
        self.progress.refresh()

    def _evaluate(self) -> dict:
        self.window_time += self.clock.charge("train")
        model = self.t.model
        was_training = model.training
        model.eval()
        val, extra = self.t.pieces.held_out(model)
        model.train(was_training)
        val = float(self.dist.mean(torch.tensor(val, device=self.t.device)))
        self.state.last_val, self.state.best_val = val, min(self.state.best_val, val)
        self.clock.charge("eval")
        self._show()
        return {"val_loss": val, **extra}

    # --- checkpoints and summary.json ----------------------------------------------------------

    def save(self) -> None:
        """A checkpoint of the current step (between steps: model and optimizer are consistent)."""
        if self.saved_step == self.state.step:
            return
        self.window_time += self.clock.charge("train")
        if not weights_finite(self.t.model, self.dist):  # never a checkpoint of non-finite weights
            first = self.watch.first_bad_step()
            raise self.diverged(first, "the training loss or the gradient norm" if first else "the weights")
        self.state.window = self.window.state()
        if self.dist.main:
            payload = {"model": self.t.model.state_dict(), "optimizer": self.t.optimizer.state_dict(),
                       **self.state.payload(), "data_step": self.state.step * self.cfg.grad_accum,
                       "rng": ckpt.rng_state(), "config": self.t.config_dict, "total_steps": self.t.total_steps,
                       "world_size": self.dist.world_size}
            directory = self.run_dir / "checkpoints"
            ckpt.save_checkpoint(directory / f"step_{self.state.step:07d}.pt", payload,
                                 also=ckpt.latest_checkpoint(self.run_dir))
        self.saved_step = self.kept_step = self.state.step
        self.clock.charge("checkpoint")
        self.write_summary("running")

    def interrupted(self) -> None:
        self.save()
        self.write_summary("interrupted")
        if self.dist.main:
            self.progress.stop()
            console.print(f"interrupted at step {self.state.step:,}; checkpoint saved. Resume with:\n  "
                          f"{self.resume_command}", soft_wrap=True, highlight=False)

    def write_summary(self, status: str, **extra) -> None:
        self.last_summary = time.monotonic()
        if hasattr(os, "getloadavg"):
            self.loads.append(os.getloadavg()[0])
        if not self.dist.main:
            return
        t, st, model = self.t, self.state, self.t.model
        times = st.times
        write_json(self.run_dir / "summary.json", {
            "format_version": SUMMARY_FORMAT_VERSION, "experiment": t.cfg.name, "run_id": self.run_dir.name,
            "status": status, **extra, "resume_command": self.resume_command,
            # seed groups: runs with one group id differ only in seed (report/groups.py compares them as one arm)
            "group": group_id(t.cfg), "seed": self.cfg.seed, "data_seed": self.cfg.data_seed,
            "params_total": model.num_params(), "params_non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": model.flops_per_token(self.cfg.seq_len), "steps": st.step,
            "total_steps": t.total_steps, "tokens_seen": st.tokens, "wall_time_s": round(times["wall"], 2),
            "tokens_per_sec": round(st.timed_tokens / times["train"], 1) if times["train"] > 0 else None,
            "train_time_s": round(times["train"], 3), "compile_time_s": round(times["compile"], 3),
            "eval_time_s": round(times["eval"], 3), "checkpoint_time_s": round(times["checkpoint"], 3),
            "peak_memory_mb": round(peak_memory_mb(t.device), 1),
            "final_val_loss": st.last_val, "best_val_loss": None if st.best_val == float("inf") else st.best_val,
            "tokenizer": t.data.tokenizer.name, "vocab_size": t.cfg.model.vocab_size,
            "data_fingerprint": t.data.fingerprint, "world_size": self.dist.world_size,
            "device": str(t.device), "compiled": self.cfg.compile,
            "layers": [{"spec": g.spec, "repeat": g.repeat} for g in t.cfg.model.layers],
            # liveness: a run killed with kill -9 stays "running"; a stale updated_at or a dead pid tells
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(),
            "host": socket.gethostname(), "started_in": os.getcwd(),  # relative paths in config.yaml start here
            # throughput is only comparable between runs on a machine that was not busy with other work
            "load_average": round(sum(self.loads) / len(self.loads), 2) if self.loads else None,
            "cpu_count": os.cpu_count(),
        })
