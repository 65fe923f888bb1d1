"""What the trainer needs for `train.stage: sft | dpo`: the data, the batch source, the loss and the held-out
measurement, built from the experiment config.

    data = prepare_stage_data(cfg)               # .tokenizer (with the template), .train, .val, .fingerprint
    stage = Stage(cfg, data, device, rank, world)  # DPO: builds the frozen reference
    stage.source.batch(index)                      # a tuple of CPU tensors for one micro-step
    stage.loss(model, batch)                       # (loss, metrics), the trainer's loss_fn contract
    stage.held_out(model)                          # (val_loss, further metrics)

Both stages start from model.init_from, a micro-arch run or a local Hugging Face folder: its tokenizer is kept
(a folder's from its tokenizer files; the template's special tokens are appended after its vocabulary, and
init_from's loader grows the embedding to match), and for DPO its weights are the frozen reference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from micro_arch.config import ExperimentConfig
from micro_arch.data.chat_template import ChatTokenizer
from micro_arch.errors import MicroArchError

from .dpo_data import Pairs, encode_pairs
from .heldout import assistant_loss, pair_logprobs, preference_metrics
from .losses import stage_loss
from .records import read_records, split_records
from .sft_data import ConversationBatches, Examples, conversation_messages, encode_conversations, global_rows


@dataclass
class StageData:
    tokenizer: ChatTokenizer
    train: Examples | Pairs
    val: Examples | Pairs
    fingerprint: str
    notes: list[str] = field(default_factory=list)  # what was skipped or cut, for the console


def stage_tokenizer(cfg: ExperimentConfig) -> ChatTokenizer:
    """model.init_from's tokenizer with the chat template's tokens after its vocabulary: a micro-arch run's own
    tokenizer, or a local Hugging Face folder's tokenizer files (after the model's embedding rows)."""
    stage = cfg.train.stage
    if not cfg.model.init_from:
        raise MicroArchError(f"train.stage={stage} needs model.init_from: the run or local Hugging Face folder to "
                             "fine-tune (its weights and tokenizer), e.g. model.init_from: runs/shakespeare-char/<run-id>")
    from micro_arch.hf.init import resolve_source, run_dir_of

    kind, path = resolve_source(cfg.model.init_from)
    if kind == "huggingface":
        from micro_arch.data.folder_tokenizer import folder_tokenizer
        from micro_arch.hf.load import read_hf_config

        hf_config, _, _ = read_hf_config(path)  # an architecture the importer refuses stops here
        return ChatTokenizer(folder_tokenizer(path, hf_config.vocab_size, f"train.stage={stage}"))
    from micro_arch.data import load_tokenizer

    return ChatTokenizer(load_tokenizer(run_dir_of(kind, path)))


def _source_text(source) -> str:
    if not isinstance(source, str):
        raise MicroArchError("data.source: train.stage sft/dpo reads one JSONL source (a file, glob or folder), "
                             "not a mixture")
    return source


def _describe(source: str, root) -> list:
    from micro_arch.data.sources import local_files, looks_local

    from .builtin_chat import builtin_file, is_builtin

    if is_builtin(source):  # its content follows from its name and the corpus: no paths or mtimes
        return [source, Path(builtin_file(source, root)).parent.name]
    if not looks_local(source):  # a hub dataset, as streamed
        return [f"hub:{source}:records"]
    return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in local_files(source)]


def prepare_stage_data(cfg: ExperimentConfig) -> StageData:
    from micro_arch.data.shards import cache_root, digest

    t, d = cfg.train, cfg.data
    tok = stage_tokenizer(cfg)
    what = "conversations" if t.stage == "sft" else "preference pairs"
    source = _source_text(d.source)
    root = cache_root(d.cache_dir)
    records = read_records(source, root, what)
    val_records = read_records(d.val_source, root, what) if d.val_source else None
    train_rec, val_rec = split_records(records, val_records, d.val_fraction, source)
    if t.stage == "sft":
        train = encode_conversations(tok, conversation_messages(train_rec), t.seq_len, "training")
        val = encode_conversations(tok, conversation_messages(val_rec), t.seq_len, "held-out")
    else:
        train = encode_pairs(tok, train_rec, t.seq_len, "training")
        val = encode_pairs(tok, val_rec, t.seq_len, "held-out")
    fingerprint = digest("stage-v1", t.stage, _describe(source, root), d.val_source and _describe(d.val_source, root),
                         None if d.val_source else d.val_fraction, tok.identity, t.seq_len)
    return StageData(tok, train, val, fingerprint, [train.report("training"), val.report("held-out")])


class PairBatches:
    """The DPO batch source: batch(index) -> (x, y, ref_logps): this rank's pairs of the global batch, chosen
    rows then rejected rows, with the reference's log-probabilities when they were computed ahead."""

    def __init__(self, pairs: Pairs, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 reference_table: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size, self.reference_table = rank, world_size, reference_table

    def batch(self, index: int):
        rows = global_rows(len(self.pairs), self.batch_size * self.world_size, self.seed, index)
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        x, y = self.pairs.rows(mine)
        ref = None
        if self.reference_table is not None:
            ref = torch.cat([self.reference_table[0][mine], self.reference_table[1][mine]])
        return x, y, ref


def build_reference(cfg: ExperimentConfig, device: torch.device, run_dir=None, evaluating: bool = False):
    """The frozen DPO reference: model.init_from's weights, in eval mode, without gradients. With the run
    directory of a run that began already (a resume; an eval, `evaluating`), they must be the weights it
    began from."""
    from micro_arch.hf.init import load_initial_weights
    from micro_arch.model.model import Model

    reference = Model(cfg.model)
    source = load_initial_weights(reference, cfg.model)
    if run_dir is not None:
        check_same_start(run_dir, source, cfg.model.init_from, evaluating)
    reference.to(device).eval()
    reference.requires_grad_(False)
    return reference


def check_same_start(run_dir, source: dict, init_from: str, evaluating: bool = False) -> None:
    """A clear error when init_from (a micro-arch run) has trained on since this run began from it (its
    parent.json): its latest weights are no longer the reference or the 'before' of an evaluation."""
    from micro_arch.checkpoint import step_checkpoints

    path = Path(run_dir) / "parent.json"
    began = json.loads(path.read_text()) if path.is_file() else {}
    if began.get("type") != "micro-arch run" or source.get("type") != "micro-arch run" or began.get("step") is None:
        return  # a folder has no steps; a checkpoint without one cannot be told apart
    if (began.get("path"), began.get("step")) == (source.get("path"), source.get("step")):
        return
    kept = [p for p in step_checkpoints(Path(began["path"])) if p.stem == f"step_{began['step']:07d}"]
    if not kept:
        fix = f"no checkpoint of step {began['step']} is left in {began['path']}/checkpoints"
    elif evaluating:  # eval reads the run's own config
        fix = f"edit model.init_from in {Path(run_dir) / 'config.yaml'} to {kept[0]}"
    else:
        fix = f"set model.init_from={kept[0]}"
    raise MicroArchError(f"model.init_from {init_from}: its weights are now step {source.get('step')} of "
                         f"{source.get('path')}, but {run_dir} began from step {began['step']} of {began['path']} "
                         f"({path}); the stage's reference and 'before' are the weights it began from: {fix}")


class Stage:
    """The stage's pieces for one process: batch source, loss and held-out measurement."""

    def __init__(self, cfg: ExperimentConfig, data: StageData, device: torch.device, rank: int = 0,
                 world_size: int = 1, run_dir=None):
        t = cfg.train
        self.cfg, self.data, self.device = cfg, data, device
        self.eval_rows = t.eval_batches * t.batch_size * world_size  # the same on every rank and world size
        self.eval_batch = t.batch_size * world_size
        if t.stage == "sft":
            self.source = ConversationBatches(data.train, t.batch_size, t.seed, rank, world_size)
            self.loss = stage_loss(t, None)
            self.reference = None
            return
        self.reference = build_reference(cfg, device, run_dir)
        table = None
        if t.dpo_precompute_reference:
            table = pair_logprobs(self.reference, data.train, t.batch_size, device, t.precision)
        self.source = PairBatches(data.train, t.batch_size, t.seed, rank, world_size, table)
        self.loss = stage_loss(t, self.reference)
        self.val_pairs = first_rows(data.val, self.eval_rows)
        self.val_reference = pair_logprobs(self.reference, self.val_pairs, self.eval_batch, device, t.precision)

    def held_out(self, model) -> tuple[float, dict]:
        """(the held-out loss the trainer logs as val_loss, further metrics for metrics.csv). Every rank
        measures the same rows, so the numbers do not depend on the number of processes."""
        t = self.cfg.train
        if t.stage == "sft":
            found = assistant_loss(model, first_rows(self.data.val, self.eval_rows), self.eval_batch, self.device,
                                   t.precision)
            return found["assistant_loss"], {}
        m = preference_metrics(model, self.val_pairs, *self.val_reference, t.dpo_beta, self.eval_batch,
                               self.device, t.precision)
        extra = {f"val/{k}": m[k] for k in ("preference_accuracy", "reward_margin", "likelihood_accuracy",
                                            "logp_chosen", "logp_rejected")}
        return m["dpo_loss"], extra


def first_rows(items: Examples | Pairs, n: int):
    if isinstance(items, Examples):
        return Examples(items.x[:n], items.y[:n])
    return Pairs(items.chosen_x[:n], items.chosen_y[:n], items.rejected_x[:n], items.rejected_y[:n])


def stage_pieces(cfg: ExperimentConfig, data: StageData, dist, device: torch.device, resume=None):
    """The trainer's StagePieces for train.stage sft or dpo (train_loop.Trainer(..., pieces=...)); resume: the
    run directory being resumed."""
    from micro_arch.train.loop import StagePieces

    stage = Stage(cfg, data, device, dist.rank, dist.world_size, resume)
    return StagePieces(stage.source, stage.loss, stage.held_out)
