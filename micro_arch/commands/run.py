"""`micro-arch run`: train an experiment into a new run directory, or resume one exactly.

The pieces: train.loop.Trainer (model, optimizer, the loop), train.step (one optimizer step and the
stage's loss), prefetch (batch sources, batches copied ahead), bookkeeping (logs, evaluation,
checkpoints, summary.json, timing), stop (Ctrl-C: save and stop between steps), divergence (a non-finite
loss stops the run), runlock (one trainer per run folder); commands.resume (what a resume starts from).
"""

from __future__ import annotations

import gc
import os
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console

from micro_arch import checkpoint as ckpt
from micro_arch.commands.resume import (
    check_resume_dir,
    check_same_model,
    note_experiment_differs,
    resumed_config,
    same_start,
    say_if_extending,
    warn,
)
from micro_arch.config import (
    ExperimentConfig,
    blame_override,
    experiment_path,
    extends_chain,
    to_dict,
)
from micro_arch.device import resolve_device, set_threads
from micro_arch.errors import MicroArchError
from micro_arch.experiment import load_experiment
from micro_arch.hf.init import PARENT_FILE
from micro_arch.model.model import Model
from micro_arch.rundir import (
    check_run_name,
    new_run_dir,
    read_run_config,
    read_summary,
    write_config,
    write_json,
)
from micro_arch.stages import stage_of
from micro_arch.train.distributed import Dist, init_distributed, launch, shutdown
from micro_arch.train.loop import Trainer, planned_steps, tokens_per_step
from micro_arch.train.optim import lr_factor
from micro_arch.train.runlock import RunLock, refuse_if_locked
from micro_arch.train.step import held_out_loss

__all__ = ["Trainer", "held_out_loss", "planned_steps", "print_plan", "run_experiment", "tokens_per_step"]

console = Console()
CHANGEABLE = {"max_steps", "max_tokens", "budget_tokens", "budget_flops", "eval_every", "log_every",
              "checkpoint_every", "sample", "eval_batches", "compile", "compile_mode", "device"}


def check_resumable(run_dir: Path, cfg: ExperimentConfig, overrides: list[str] | None = None) -> None:
    """A run may be resumed with a longer budget or other cadences, never with another model or data."""
    old = to_dict(read_run_config(run_dir))
    new = to_dict(cfg)
    diffs = {f"{section}.{k}": (old[section].get(k), new[section][k]) for section in ("model", "data", "train")
             for k in new[section]
             if old[section].get(k) != new[section][k] and not (section == "train" and k in CHANGEABLE)}
    if "model.init_from" in diffs and same_start(run_dir, diffs["model.init_from"][1]):
        del diffs["model.init_from"]  # the parent's checkpoint of the step this run began from: the same weights
    if diffs:
        given = {o.split("=", 1)[0].strip(): o for o in overrides or []}
        values = "; ".join(f"{'--set ' + given[key] if key in given else key}: the run has {was!r}"
                           for key, (was, _) in diffs.items())
        raise MicroArchError(f"{run_dir}: a resumed run keeps its model, data and training settings ({values}); "
                             f"only train.{', train.'.join(sorted(CHANGEABLE))} may change on resume; leave those "
                             "--set out, or start a new run (without --resume) to train with them")


def check_sample_prompts(cfg: ExperimentConfig, tokenizer) -> None:
    """The end-of-run sample's prompts, encoded before the first step (not found to fail after the last)."""
    from micro_arch.eval.generate import encode_prompt

    for prompt in cfg.train.sample.prompts:
        try:
            encode_prompt(tokenizer, prompt)
        except MicroArchError as err:
            raise MicroArchError(f"train.sample.prompts: {err}; the sample at the end of training would fail: "
                                 "change the prompts (e.g. --set 'train.sample.prompts=[\"\\n\"]') or the "
                                 "tokenizer") from None


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
                  f"{tokens:,} tokens ({tokens / n_ne:.2g} tokens per non-embedding parameter), "
                  f"{flops * tokens:.3g} FLOPs", soft_wrap=True)
    console.print(f"  peak memory       {est.summary()}", soft_wrap=True)
    if est.warning:  # the fake-tensor trace failed: say so, never fall back silently
        console.print(f"  [bold yellow]warning[/]: {escape(est.warning)}", soft_wrap=True)


def _cli_args(target, overrides, resume, runs_root, checkpoint=None, into=None) -> list[str]:
    args = ["run", str(target), "--runs-dir", str(runs_root)] + (["--into", str(into)] if into else [])
    if overrides:
        args += ["--set", *overrides]
    if resume:
        args += ["--resume", str(resume)]
    if checkpoint:
        args += ["--checkpoint", str(checkpoint)]
    return args


def resume_command(target, overrides, run_dir: Path) -> str:
    """The exact command that continues this run (the overrides must match the run's config)."""
    args = ["micro-arch", "run", str(target), "--resume", str(run_dir)]
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    return shlex.join(args + (["--set", *overrides] if overrides else []))


def run_experiment(target, overrides=None, resume=None, dry_run=False, runs_root="runs", nproc=1,
                   on_eval=None, checkpoint=None, into=None) -> Path | None:
    """Train `target` (an experiment folder); returns the run directory (None on non-main ranks).
    `on_eval(step, val_loss)` is called after each held-out evaluation (single process only; sweeps
    use it to prune); an exception it raises stops training and propagates. Ctrl-C (or SIGTERM) saves
    a checkpoint between steps and raises stop.RunInterrupted (a KeyboardInterrupt). `into`: the folder a new
    run goes into (created; a seed group's member), instead of a new runs_root/<experiment>/<run-id>."""
    overrides = list(overrides or [])
    if resume:
        resume = check_resume_dir(resume)
    if nproc > 1 and "RANK" not in os.environ and not dry_run:
        if resume:
            refuse_if_locked(resume)  # rank 0 takes the lock; a refusal here is one line, not a failed launch
        code = launch(nproc, _cli_args(target, overrides, resume, runs_root, checkpoint, into))
        if code in (130, -2):
            raise KeyboardInterrupt
        if code:
            raise MicroArchError(f"distributed training with {nproc} processes failed (exit code {code})")
        return None

    cfg = load_experiment(target, overrides)
    try:
        check_run_name(cfg.name)
    except MicroArchError as err:
        raise blame_override(err, overrides) from None
    if resume:
        experiment, cfg = cfg, resumed_config(resume, overrides)
    set_threads()
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device.type)
    lock = None
    try:
        if resume and not dry_run:  # one trainer per run folder: rank 0 holds the lock, every rank hears
            lock = RunLock(resume) if dist.main else None
            refusal = dist.broadcast(lock.refusal() if lock else None)
            if refusal:
                raise MicroArchError(refusal)
            if dist.main:
                note_experiment_differs(resume, target, experiment, cfg)
        if not dist.main:
            dist.barrier()  # let rank 0 fill the data cache first
        stage = stage_of(cfg)
        data = stage.prepare_data(cfg)  # token windows; SFT/DPO: records with init_from's tokenizer and the template
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
            payload = _load_resume_state(Path(resume), cfg, checkpoint, dist, device, overrides)
            if payload["step"] >= planned_steps(cfg, dist.world_size):
                if dist.main:
                    _say_complete(Path(resume), target, overrides, payload, cfg, dist.world_size)
                return Path(resume) if dist.main else None
            if dist.main:
                say_if_extending(Path(resume), payload, cfg, dist.world_size)
                _warn_if_schedule_changes(payload, cfg, dist.world_size)
                _warn_if_processes_change(payload, cfg, dist.world_size)
        elif checkpoint:
            raise MicroArchError(f"--checkpoint {checkpoint} picks the checkpoint of a run to resume; "
                                 "add --resume RUN_DIR")
        # Everything that can fail on bad input (model, optimizer, data lengths, a forward pass for the
        # trace) runs before a new run directory exists, so a failed start leaves nothing behind.
        pieces = stage.pieces(cfg, data, device, dist.rank, dist.world_size, resume)
        if dist.main and not resume:
            for note in pieces.notes:
                console.print(f"{stage.name}: {note}", highlight=False)
        trainer = Trainer(cfg, data, dist, device, payload, on_eval=on_eval, pieces=pieces)
        check_sample_prompts(cfg, data.tokenizer)
        trace = _trace(trainer.model, cfg, device) if dist.main and not resume else None
        run_dir = Path(resume) if resume else (_fresh_dir(into, runs_root, cfg.name) if dist.main else None)
        if dist.main and not resume:
            lock = RunLock(run_dir)
            lock.acquire()
        run_dir = Path(dist.broadcast(str(run_dir)))
        with _removed_on_failure(run_dir, fresh=not resume and dist.main, trainer=trainer):
            if dist.main:
                _announce(cfg, trainer, run_dir, resume)
                write_config(run_dir, cfg)  # on resume too: the run's config records its new budget
                if not resume:
                    data.tokenizer.save(run_dir)
                    _keep_experiment_blocks(target, run_dir)
                    (run_dir / "trace.txt").write_text(trace)
                if trainer.parent is not None:
                    write_json(run_dir / PARENT_FILE, trainer.parent)
            trainer.train(run_dir, resume_command(target, overrides, run_dir))
        if dist.main:
            _finish(cfg, trainer, run_dir, data.tokenizer)
        return run_dir if dist.main else None
    finally:
        if lock is not None:
            lock.release()
        # DDP's reducer holds the process group: freed only after destroy_process_group, it would tear gloo
        # down from a garbage-collection callback that holds the GIL its threads wait for (a hang at exit)
        trainer = pieces = None  # noqa: F841
        gc.collect()
        shutdown()


def _fresh_dir(into, runs_root, name: str) -> Path:
    if into is None:
        return new_run_dir(runs_root, name)
    Path(into).mkdir(parents=True, exist_ok=True)
    return Path(into)


def _keep_experiment_blocks(target, run_dir: Path) -> None:
    """Copies of the experiment's own blocks.py and of those of the experiments it extends
    (blocks-extends-N.py), which rundir.load_run imports: eval, generate and compare rebuild the model from
    the run directory alone."""
    *parents, own = extends_chain(experiment_path(target))
    for config_file, name in [*((p, f"blocks-extends-{i}.py") for i, p in enumerate(parents)), (own, "blocks.py")]:
        if (config_file.parent / "blocks.py").is_file():
            shutil.copyfile(config_file.parent / "blocks.py", run_dir / name)


def _load_resume_state(run_dir: Path, cfg: ExperimentConfig, checkpoint, dist: Dist, device, overrides=None) -> dict:
    """The checkpoint to resume from, after removing half-written files and warning about damaged ones."""
    check_resumable(run_dir, cfg, overrides)
    summary = read_summary(run_dir)
    if summary.get("status") == "diverged":  # a resume is bit-for-bit: it would diverge again at the same step
        raise MicroArchError(f"{run_dir}: this run diverged at step {summary.get('diverged_at_step')} (see the error in "
                             "its summary.json for the likely causes); resumed with the same settings it would "
                             "diverge again at the same step: fix the setting and start a new run without --resume")
    if dist.main:
        for path in ckpt.remove_partial_saves(run_dir):
            warn(f"removed {path}, left by a process stopped in the middle of a save")
    dist.barrier()
    payload, path, skipped = ckpt.load_for_resume(run_dir, checkpoint, map_location=device)
    if skipped and dist.main:
        warn(f"{run_dir}: skipped {', '.join(skipped)}; resuming from {path.name} (step {payload['step']}), "
             "the newest intact checkpoint")
    check_same_model(run_dir, path, payload, cfg, checkpoint)
    return payload


def _say_complete(run_dir: Path, target, overrides, payload, cfg, world_size) -> None:
    steps = planned_steps(cfg, world_size)
    longer = [o for o in overrides if not o.startswith(("train.max_steps=", "train.max_tokens=", "train.budget_"))]
    t = cfg.train  # a token or FLOP budget outranks max_steps: cleared in the suggestion
    unset = [f"train.{k}=null" for k in ("max_tokens", "budget_tokens", "budget_flops") if getattr(t, k) is not None]
    more = resume_command(target, [*longer, f"train.max_steps={2 * max(payload['step'], 1)}", *unset], run_dir)
    console.print(f"{run_dir}: this run is complete ({payload['step']:,} of {steps:,} steps); nothing to do, "
                  f"nothing changed. To train it further, resume with a larger train.max_steps, e.g.\n  {more}",
                  soft_wrap=True, highlight=False)


def _warn_if_schedule_changes(payload: dict, cfg: ExperimentConfig, world_size: int) -> None:
    """A new step budget re-stretches a decaying schedule: the learning rate jumps at the resumed step."""
    old_total = payload.get("total_steps")
    if old_total is None:  # checkpoints from before total_steps was recorded
        old_train = payload["config"]["train"]
        old_total = old_train["max_steps"] if old_train.get("max_tokens") is None else None
    new_total, t, step = planned_steps(cfg, world_size), cfg.train, payload["step"]
    if old_total is None or old_total == new_total or t.schedule == "constant":
        return
    before, after = (t.lr * lr_factor(step, t, n) for n in (old_total, new_total))
    warn(f"the step budget changes from {old_total:,} to {new_total:,} steps: the {t.schedule} learning-rate "
         f"schedule is stretched over the new length, so from step {step:,} on the learning rate follows it "
         f"({before:.3g} -> {after:.3g} at step {step:,}); the run is no longer the same as one planned for "
         f"{new_total:,} steps from the start")


def _warn_if_processes_change(payload: dict, cfg: ExperimentConfig, world_size: int) -> None:
    """Another number of processes is another global batch (batch_size is per process)."""
    old = payload.get("world_size")  # None: a checkpoint from before it was recorded
    if old is None or old == world_size:
        return
    rows = [cfg.train.batch_size * cfg.train.grad_accum * n for n in (old, world_size)]
    warn(f"this run trained with {old} process(es) and resumes with {world_size}: the global batch changes from "
         f"{rows[0]:,} to {rows[1]:,} sequences per step at step {payload['step']:,}, so the run is no longer the same "
         f"as one trained either way from the start; resume with --nproc {old} to keep it")


@contextmanager
def _removed_on_failure(run_dir: Path, fresh: bool, trainer):
    """A new run directory that fails before its first step or checkpoint is removed again; one that holds
    checkpoints is never removed (it can be resumed)."""
    try:
        yield
    except BaseException as err:
        # a second Ctrl-C aborts without saving: a folder without a checkpoint cannot be resumed, so it goes too
        aborted = isinstance(err, KeyboardInterrupt)
        if fresh and (trainer.step == 0 or aborted) and not ckpt.has_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _trace(model, cfg, device) -> str:
    from micro_arch.model.trace import render, trace_model, trace_text

    idx = torch.zeros(1, cfg.train.seq_len, dtype=torch.long, device=device)
    return trace_text(render(trace_model(model, idx)))


def _announce(cfg, trainer, run_dir, resume) -> None:
    m = trainer.model
    verb = f"resuming at step {trainer.step:,}, training" if resume else "training"
    console.print(f"[bold]{cfg.name}[/]: {verb} {m.num_params():,} parameters "
                  f"({m.num_params(non_embedding=True):,} without embeddings) for {trainer.total_steps:,} steps "
                  f"on {trainer.device} x{trainer.dist.world_size} -> {run_dir}")


def _finish(cfg, trainer, run_dir: Path, tokenizer) -> None:
    s, chat = cfg.train.sample, stage_of(cfg).is_chat  # SFT and DPO runs are chat models
    texts = _samples(cfg, trainer.model, tokenizer, chat)
    write_json(run_dir / "samples.json", [{"prompt": p, "text": t} | ({"as": "assistant reply"} if chat else {})
                                          for p, t in zip(s.prompts, texts)])
    console.print(f"held-out loss {trainer.last_val:.4f} after {trainer.step:,} steps, "
                  f"{trainer.state.tokens:,} tokens, {trainer.elapsed:.1f} s")
    for prompt, text in zip(s.prompts, texts):
        console.rule(f"{'reply to' if chat else 'sample'}: {prompt!r}")
        console.print(f"user: {prompt}\nassistant: {text}" if chat else prompt + text, highlight=False, markup=False)
    console.print(f"run directory: {run_dir}")


def _samples(cfg, model, tokenizer, chat: bool) -> list[str]:
    """Continuations of train.sample's prompts; for a chat model (an SFT or DPO run), the assistant's reply
    to each prompt as a user turn, through the chat template, as `micro-arch chat` gives it."""
    s = cfg.train.sample
    if chat:
        from micro_arch.eval.chat import ChatSession

        return [ChatSession(model, tokenizer, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens, seed=cfg.train.seed).reply(p) for p in s.prompts]
    from micro_arch.eval.generate import sample_texts

    return sample_texts(model, tokenizer, s.prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, seed=cfg.train.seed)
