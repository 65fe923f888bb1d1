"""Every shipped experiment works on a fresh clone, with no manual data step (issue 21): trace on all of them,
and the SFT and DPO experiments train on their built-in dialogue data from a pretrain run."""

import json

import pytest
from helpers import ROOT

from micro_arch.commands.run import run_experiment
from micro_arch.commands.trace import trace_command
from micro_arch.stages.builtin_chat import builtin_file
from micro_arch.stages.records import read_records

SMALL = ["model.d_model=32", "model.n_heads=2", "model.layers=[{spec: 'Norm->Attn->+->Norm->MLP->+', repeat: 1}]",
         "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
         "train.checkpoint_every=2", "train.batch_size=2", "train.sample.max_new_tokens=4"]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments").iterdir()
                                        if (p / "config.yaml").is_file()))
def test_trace_works_on_every_shipped_experiment(name, tmp_path):
    trace_command(ROOT / "experiments" / name, ["train.batch_size=1", "train.seq_len=8"], depth=0,
                  out=tmp_path / "trace.txt")
    assert "params" in (tmp_path / "trace.txt").read_text()


def test_sft_and_dpo_train_on_built_in_dialogues_from_a_pretrain_run(tmp_path):
    base = run_experiment(ROOT / "experiments" / "shakespeare-char", runs_root=tmp_path / "runs", overrides=SMALL)
    sft = run_experiment(ROOT / "experiments" / "shakespeare-sft", runs_root=tmp_path / "runs",
                         overrides=SMALL + [f"model.init_from={base}"])
    dpo = run_experiment(ROOT / "experiments" / "shakespeare-dpo", runs_root=tmp_path / "runs",
                         overrides=SMALL + [f"model.init_from={sft}"])
    for run in (sft, dpo):
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_built_in_dialogues_are_built_once_and_split_by_works(tmp_path):
    train = builtin_file("shakespeare-chat:sft_train", tmp_path)
    assert builtin_file("shakespeare-chat:sft_val", tmp_path).startswith(str(tmp_path))
    stamp = (tmp_path / "builtin").stat().st_mtime_ns
    assert builtin_file("shakespeare-chat:dpo_train", tmp_path).rsplit("/", 1)[0] == train.rsplit("/", 1)[0]
    assert (tmp_path / "builtin").stat().st_mtime_ns == stamp  # no second build
    users = {r["messages"][1]["content"] for _, r in read_records("shakespeare-chat:sft_train", tmp_path, "x")}
    held = [r["messages"][1]["content"] for _, r in read_records("shakespeare-chat:sft_val", tmp_path, "x")]
    long = [u for u in held if len(u) > 60]
    assert len(users) > 10000 and len(long) > 500 and not any(u in users for u in long)
    with pytest.raises(Exception, match="did you mean: shakespeare-chat:sft_train|sft_train"):
        builtin_file("shakespeare-chat:sft_trian", tmp_path)


def test_prepare_on_a_stage_experiment_makes_its_records(capsys):
    from micro_arch.commands.prepare import prepare_command

    result = prepare_command(ROOT / "experiments" / "shakespeare-sft")
    rows = result["plan"]["sources"]
    assert [r["source"] for r in rows] == ["shakespeare-chat:sft_train", "shakespeare-chat:sft_val"]
    assert all(r["files"] == 1 and r["bytes"] > 100_000 for r in rows)
    assert "records ready" in capsys.readouterr().out
