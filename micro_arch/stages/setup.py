"""What the chat stages (`train.stage: sft | dpo`) share: init_from's tokenizer with the chat template, JSONL
records read and split, the frozen starting weights, and the data they prepare.

    data = prepare_stage_data(cfg, stage)  # .tokenizer (with the template), .train, .val, .fingerprint, .notes

Both stages start from model.init_from, a micro-arch run or a local Hugging Face folder: its tokenizer is kept
(a folder's from its tokenizer files; the template's special tokens are appended after its vocabulary, and
init_from's loader grows the embedding to match), and for DPO its weights are the frozen reference. What differs
between them (encoding, batches, loss, held-out measure) is in sft.py and dpo.py.
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

from .dpo_data import Pairs
from .records import read_records, split_records
from .sft_data import Examples


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


def prepare_stage_data(cfg: ExperimentConfig, stage) -> StageData:
    """`stage` (SFT or DPO) names its records and encodes them."""
    from micro_arch.data.shards import cache_root, digest

    t, d = cfg.train, cfg.data
    tok = stage_tokenizer(cfg)
    source = _source_text(d.source)
    root = cache_root(d.cache_dir)
    records = read_records(source, root, stage.records)
    val_records = read_records(d.val_source, root, stage.records) if d.val_source else None
    train_rec, val_rec = split_records(records, val_records, d.val_fraction, source)
    train = stage.encode(tok, train_rec, t.seq_len, "training")
    val = stage.encode(tok, val_rec, t.seq_len, "held-out")
    fingerprint = digest("stage-v1", t.stage, _describe(source, root), d.val_source and _describe(d.val_source, root),
                         None if d.val_source else d.val_fraction, tok.identity, t.seq_len)
    return StageData(tok, train, val, fingerprint, [train.report("training"), val.report("held-out")])


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
        fix = f"resume with --set model.init_from={kept[0]} (the same weights, so the run stays the same)"
    raise MicroArchError(f"model.init_from {init_from}: its weights are now step {source.get('step')} of "
                         f"{source.get('path')}, but {run_dir} began from step {began['step']} of {began['path']} "
                         f"({path}); the stage's reference and 'before' are the weights it began from: {fix}")


def first_rows(items: Examples | Pairs, n: int):
    if isinstance(items, Examples):
        return Examples(items.x[:n], items.y[:n])
    return Pairs(items.chosen_x[:n], items.chosen_y[:n], items.rejected_x[:n], items.rejected_y[:n])
