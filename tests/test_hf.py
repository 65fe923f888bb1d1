"""Hugging Face interop: model.init_from (run directories and HF folders) and micro-arch export."""

import json
import textwrap

import pytest
import torch

from micro_arch.checkpoint import latest_checkpoint, load_checkpoint
from micro_arch.config import ModelConfig, from_dict
from micro_arch.errors import MicroArchError
from micro_arch.experiment import load_experiment
from micro_arch.hf.init import load_initial_weights
from micro_arch.model import Model
from micro_arch.rundir import read_run_config
from micro_arch.train import run_experiment

TINY = """
model:
  d_model: 32
  n_heads: 2
  max_seq_len: 32
  positions: learned
  layers: [{spec: "Norm->Attn->+->Norm->MLP->+", repeat: 2}]
  tie_embeddings: false
data: {source: shakespeare, tokenizer: char}
train:
  batch_size: 2
  seq_len: 32
  max_steps: 3
  warmup_steps: 1
  eval_every: 3
  eval_batches: 1
  log_every: 1
  checkpoint_every: 3
  sample: {prompts: ["A"], max_new_tokens: 2}
"""


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parent")
    exp = root / "tiny"
    exp.mkdir()
    (exp / "config.yaml").write_text(textwrap.dedent(TINY))
    return exp, run_experiment(exp, runs_root=root / "runs")


def child_config(exp, run_dir, *overrides):
    cfg = load_experiment(exp, [f"model.init_from={run_dir}", *overrides])
    cfg.model.vocab_size = cfg.model.vocab_size or read_run_config(run_dir).model.vocab_size
    return cfg


def test_init_from_a_run_loads_its_weights_exactly(parent_run, tmp_path):
    exp, run_dir = parent_run
    saved = load_checkpoint(latest_checkpoint(run_dir))["model"]
    cfg = child_config(exp, run_dir)
    model = Model(cfg.model)
    parent = load_initial_weights(model, cfg.model, tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert parent["run_id"] == run_dir.name and parent["step"] == 3 and parent["changed"] == {}
    assert json.loads((tmp_path / "parent.json").read_text())["path"] == str(run_dir.resolve())


def test_init_from_extends_positions_and_grows_the_vocabulary(parent_run):
    exp, run_dir = parent_run
    saved = load_checkpoint(latest_checkpoint(run_dir))["model"]
    vocab = read_run_config(run_dir).model.vocab_size
    cfg = child_config(exp, run_dir, "model.max_seq_len=80", f"model.vocab_size={vocab + 5}", "model.dropout=0.1")
    model = Model(cfg.model)
    parent = load_initial_weights(model, cfg.model)
    old = saved["pos_embed.weight"]
    assert torch.equal(model.pos_embed.weight[:32], old)
    assert torch.equal(model.pos_embed.weight[32:64], old) and torch.equal(model.pos_embed.weight[64:], old[:16])
    for key in ("embed.weight", "head.weight"):
        grown = model.state_dict()[key]
        assert torch.equal(grown[:vocab], saved[key])
        torch.testing.assert_close(grown[vocab:], saved[key].mean(0).expand(5, -1))
    assert parent["changed"] == {"max_seq_len": [32, 80], "vocab_size": [vocab, vocab + 5], "dropout": [0.0, 0.1]}


@pytest.mark.parametrize("override, message", [
    ("model.d_model=64", "model.d_model is 32 in the source, 64 here"),
    ("model.layers.0.spec=Norm->Attn(window=8)->+->Norm->MLP->+",
     "layer 0, branch 0, block 1 (Attention): window is None in the source, 8 here"),
    ("model.defaults.MLP=gelu_mlp", "layer 0, branch 0, block 3 is SwiGLU in the source, GeluMLP here"),
    ("model.vocab_size=60", "model.vocab_size is 84 in the source, 60 here"),  # the corpus has 84 characters
])
def test_init_from_a_mismatching_config_names_the_first_difference(parent_run, override, message):
    exp, run_dir = parent_run
    cfg = child_config(exp, run_dir, override)
    with pytest.raises(MicroArchError, match="does not match the source") as err:
        load_initial_weights(Model(cfg.model), cfg.model)
    assert message in str(err.value)


def test_init_from_a_missing_path_or_hub_name_fails_fast():
    cfg = from_dict(ModelConfig, {"vocab_size": 10, "init_from": "meta-llama/Llama-3.2-1B"})
    with pytest.raises(MicroArchError, match="hub name, and micro-arch never downloads"):
        load_initial_weights(Model(cfg), cfg)


def test_a_run_started_from_a_parent_records_it_and_starts_from_its_weights(parent_run, tmp_path):
    exp, run_dir = parent_run
    child = run_experiment(exp, runs_root=tmp_path / "runs",
                           overrides=[f"model.init_from={run_dir}", "train.max_steps=1", "train.lr=1e-9",
                                      "train.min_lr=1e-9", "train.eval_every=1", "train.checkpoint_every=1"])
    parent = json.loads((child / "parent.json").read_text())
    assert parent["run_id"] == run_dir.name and parent["experiment"] == "tiny"
    before = load_checkpoint(latest_checkpoint(run_dir))["model"]
    after = load_checkpoint(latest_checkpoint(child))["model"]
    for key in before:  # one step at lr 1e-9 moves nothing visibly: the child started from the parent
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
