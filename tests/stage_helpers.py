"""What the tests of the later stages share: tiny models, JSONL records, runs made by hand and stage
configs (the chat-template tokenizer is the `tok` fixture in conftest)."""

import json

import torch
import yaml

from micro_arch.config import LayerGroup, ModelConfig
from micro_arch.data import CharTokenizer
from micro_arch.model.model import Model

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-<>|\n"


CONVERSATION = [
    {"role": "system", "content": "PERSONS: VIOLA, CAPTAIN."},
    {"role": "user", "content": "What country, friends, is this?"},
    {"role": "assistant", "content": "This is Illyria, lady."},
    {"role": "user", "content": "And what should I do in Illyria?"},
    {"role": "assistant", "content": "Perchance he is not drown'd."},
]


def tiny_model(vocab_size, seed=0, seq=256):
    torch.manual_seed(seed)
    return Model(ModelConfig(d_model=32, n_heads=2, max_seq_len=seq, vocab_size=vocab_size,
                             layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 1)]))


def tiny_model_section(max_seq_len, **more):
    """The model section of the tiny experiments here: one pre-norm layer of width 32."""
    return {"d_model": 32, "n_heads": 2, "max_seq_len": max_seq_len,
            "layers": [{"spec": "Norm->Attn->+->Norm->MLP->+", "repeat": 1}], **more}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_run(folder, seed=0, chars=TEXT, extra=None):
    """A run directory by hand: config, tokenizer and a checkpoint of a random tiny model."""
    from micro_arch.checkpoint import save_checkpoint
    from micro_arch.config import ExperimentConfig
    from micro_arch.rundir import write_config

    folder.mkdir(parents=True)
    base = CharTokenizer(chars)
    cfg = ExperimentConfig(name="tiny")
    cfg.model = ModelConfig(d_model=32, n_heads=2, max_seq_len=64, vocab_size=base.vocab_size + (extra or 0),
                            layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 1)])
    cfg.train.seq_len = 32
    write_config(folder, cfg)
    base.save(folder)
    model = tiny_model(cfg.model.vocab_size, seed=seed, seq=64)
    save_checkpoint(folder / "checkpoints/latest.pt", {"model": model.state_dict()})
    return folder, model, base


def stage_config(tmp_path, stage, source, parent, **train):
    from micro_arch.config import ExperimentConfig, from_dict

    cfg = from_dict(ExperimentConfig, {
        "model": tiny_model_section(64, vocab_size=len(set(TEXT)) + 4, init_from=str(parent)),
        "data": {"source": source, "val_source": source, "cache_dir": str(tmp_path / "cache")},
        "train": {"stage": stage, "seq_len": 64, "batch_size": 2, "eval_batches": 1, **train}})
    return cfg


PAIRS = [{"prompt": "Who goes there?", "chosen": "Nay, answer me.", "rejected": "Good night."},
         {"prompt": "What is the hour?", "chosen": "Twelve, my lord.", "rejected": "A ship, a ship."},
         {"prompt": "Is it the king?", "chosen": "It is.", "rejected": "Go to, go to."}]


PRETRAIN = yaml.safe_dump({
    "model": tiny_model_section(32), "data": {"source": "shakespeare", "tokenizer": "char"},
    "train": {"batch_size": 4, "seq_len": 32, "max_steps": 8, "warmup_steps": 2, "eval_every": 8, "eval_batches": 1,
              "log_every": 4, "sample": {"prompts": ["A"], "max_new_tokens": 4}}})


STAGE = """
extends: ../pretrain/config.yaml
model: {{max_seq_len: 160, dropout: 0.1}}
data: {{source: {train}, val_source: {val}}}
train: {{stage: {stage}, seq_len: 160, batch_size: 4, max_steps: 8, lr: 1.0e-3, warmup_steps: 2, eval_every: 4,
        eval_batches: 1, log_every: 2, checkpoint_every: 4}}
"""
