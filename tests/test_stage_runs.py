"""SFT and DPO runs: the frozen reference, their starting run, context extension, exact resume and DDP."""

import json
import math

import pytest
import torch
from stage_helpers import (
    PAIRS,
    make_run,
    stage_config,
    tiny_model,
    write_jsonl,
)

from micro_arch.config import LayerGroup, ModelConfig
from micro_arch.data.chat_template import (
    load_chat_tokenizer,
)
from micro_arch.errors import MicroArchError
from micro_arch.model.model import Model


def test_dpo_reference_stays_frozen_while_the_policy_trains(tmp_path):
    from micro_arch.hf.init import load_initial_weights
    from micro_arch.stages import stage_of

    parent, _, _ = make_run(tmp_path / "parent")
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = stage_config(tmp_path, "dpo", source, parent, dpo_beta=0.5)
    data = stage_of(cfg).prepare_data(cfg)
    assert len(data.train) == 3 and data.tokenizer.vocab_size == cfg.model.vocab_size
    stage = stage_of(cfg).pieces(cfg, data, torch.device("cpu"))
    policy = Model(cfg.model)
    load_initial_weights(policy, cfg.model)
    start = {k: v.clone() for k, v in stage.reference.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for step in range(4):
        loss, metrics = stage.loss_fn(policy, stage.source.batch(step))
        if step == 0:  # the policy starts as the reference: every implicit reward is 0
            assert float(loss.detach()) == pytest.approx(math.log(2), rel=1e-5)
            assert float(metrics["dpo/reward_margin"]) == pytest.approx(0, abs=1e-5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss.detach()) < math.log(2)
    assert not stage.reference.training and not any(p.requires_grad for p in stage.reference.parameters())
    for k, v in stage.reference.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in policy.state_dict().items())
    val_loss, extra = stage.held_out(policy)
    assert val_loss < math.log(2) and extra["val/preference_accuracy"] > 0.5
    # the reference's log-probabilities computed once give the same losses
    cfg.train.dpo_precompute_reference = True
    ahead = stage_of(cfg).pieces(cfg, data, torch.device("cpu"))
    for step in range(3):
        batch = ahead.source.batch(step)
        assert batch[2] is not None
        torch.testing.assert_close(ahead.loss_fn(policy, batch)[0], stage.loss_fn(policy, stage.source.batch(step))[0])


def test_dpo_straight_from_a_pretraining_run_warns(tmp_path, capsys):
    """Issue 25: DPO from a run that never saw the chat template runs, and says that DPO usually follows SFT."""
    from micro_arch.rundir import read_run_config, write_config
    from micro_arch.stages import stage_of

    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    pretrained, _, _ = make_run(tmp_path / "pretrained")
    cfg = stage_config(tmp_path, "dpo", source, pretrained)
    stage_of(cfg).prepare_data(cfg)
    err = capsys.readouterr().err
    assert f"warning: train.stage=dpo starts from {pretrained}, a pretraining run" in err and "SFT" in err, err
    sft, _, _ = make_run(tmp_path / "sft")
    cfg = read_run_config(sft)
    cfg.train.stage = "sft"
    write_config(sft, cfg)
    cfg = stage_config(tmp_path, "dpo", source, sft)
    stage_of(cfg).prepare_data(cfg)
    assert "warning" not in capsys.readouterr().err


def test_a_reference_that_trained_on_since_the_run_began_is_refused(tmp_path):
    """DPO's resumed reference and eval's 'before' are init_from's weights as the run began: when the parent run
    has trained on (its latest.pt moved), say so and name the parent's checkpoint of that step."""
    from micro_arch.checkpoint import save_checkpoint
    from micro_arch.hf.init import load_initial_weights
    from micro_arch.stages.setup import build_reference

    parent, model, _ = make_run(tmp_path / "parent")
    began = {"model": model.state_dict(), "step": 5}
    save_checkpoint(parent / "checkpoints/latest.pt", began, also=parent / "checkpoints/step_0000005.pt")
    cfg = stage_config(tmp_path, "dpo", "unused.jsonl", parent)
    cfg.model.vocab_size = model.cfg.vocab_size
    child = tmp_path / "child"
    child.mkdir()
    load_initial_weights(Model(cfg.model), cfg.model, child)  # what a fresh run does: parent.json, step 5
    build_reference(cfg, "cpu", child)
    later = tiny_model(model.cfg.vocab_size, seed=1, seq=64).state_dict()
    save_checkpoint(parent / "checkpoints/latest.pt", {"model": later, "step": 7})  # the parent trained on
    with pytest.raises(MicroArchError, match=r"now step 7 .* began from step 5 .*model.init_from=.*step_0000005.pt"):
        build_reference(cfg, "cpu", child)
    with pytest.raises(MicroArchError, match=r"edit model.init_from in .*child.config.yaml to .*step_0000005.pt"):
        build_reference(cfg, "cpu", child, evaluating=True)
    cfg.model.init_from = str(parent / "checkpoints/step_0000005.pt")
    reference = build_reference(cfg, "cpu", child)
    for key, value in model.state_dict().items():
        assert torch.equal(reference.state_dict()[key], value), key
    began = json.loads((child / "parent.json").read_text())
    (child / "parent.json").write_text(json.dumps({**began, "step": None}))  # a parent saved without its step
    cfg.model.init_from = str(parent)
    build_reference(cfg, "cpu", child)  # nothing to compare: no check, and no crash


def test_stages_need_a_run_to_start_from(tmp_path):
    from micro_arch.stages import stage_of

    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = stage_config(tmp_path, "dpo", source, "x")
    cfg.model.init_from = None
    with pytest.raises(MicroArchError, match="train.stage=dpo needs model.init_from"):
        stage_of(cfg).prepare_data(cfg)


def test_position_interpolation_turns_position_p_as_p_over_the_factor():
    from micro_arch.blocks.attention import rope_tables

    plain, scaled = rope_tables(16, 64, 10000.0), rope_tables(16, 128, 10000.0, scaling=2.0)
    torch.testing.assert_close(scaled[0::2], plain)
    # every position, odd ones included, turns by half its plain angle: squared, the plain rotation
    torch.testing.assert_close(scaled ** 2, rope_tables(16, 128, 10000.0), rtol=1e-4, atol=1e-4)


def test_context_extension_from_a_run_reports_both_lengths(tmp_path):
    from micro_arch.eval.context import context_lines, extended_from
    from micro_arch.hf.init import load_initial_weights

    parent, small, base = make_run(tmp_path / "parent")
    cfg = ModelConfig(d_model=32, n_heads=2, max_seq_len=128, vocab_size=base.vocab_size, rope_scaling=2.0,
                      layers=[LayerGroup("Norm->Attn->+->Norm->MLP->+", 1)], init_from=str(parent))
    model = Model(cfg)
    run = tmp_path / "extended"
    run.mkdir()
    provenance = load_initial_weights(model, cfg, run)
    assert provenance["changed"]["max_seq_len"] == [64, 128] and extended_from(run) == 64
    assert provenance["changed"]["rope_scaling"] == [1.0, 2.0]  # parent.json says what the run changed
    torch.testing.assert_close(model.state_dict()["embed.weight"], small.state_dict()["embed.weight"])
    tokens = base.encode_array("the quick brown fox jumps over the lazy dog. " * 20)
    lines = context_lines(run, model.eval(), tokens, 128, 8, "cpu")
    assert len(lines) == 2 and "64-token windows (the parent's length)" in lines[0]
    assert "128-token windows (this run's length)" in lines[1]
    assert context_lines(tmp_path / "parent", small, tokens, 64, 8, "cpu") == []


def check_resume_is_exact(exp, overrides, full, tmp_path):
    import shutil

    from micro_arch.commands.run import run_experiment

    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    shutil.copy(stopped / "checkpoints/step_0000004.pt", stopped / "checkpoints/latest.pt")
    (stopped / "checkpoints/step_0000008.pt").unlink()
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=overrides, resume=stopped)
    torch.testing.assert_close(losses(stopped), losses(full), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert [r["tokens"] for r in read_metrics(stopped)] == [r["tokens"] for r in read_metrics(full)]
    weights = [torch.load(run / "checkpoints/latest.pt", weights_only=True)["model"] for run in (stopped, full)]
    torch.testing.assert_close(*weights, rtol=1e-5, atol=1e-6)


def assert_tokens_count_trimmed_batches(pretrain, stage_run, rows_per_step):
    """Pretraining counts batch x seq_len per step; a stage counts the positions of its batches, which are
    trimmed to their longest row: fewer than batch x seq_len, and rows_per_step rows each time."""
    pre = [int(r["tokens"]) for r in read_metrics(pretrain)]
    assert pre == [int(r["step"]) * 4 * 32 for r in read_metrics(pretrain)]
    rows = read_metrics(stage_run)
    tokens = [int(r["tokens"]) for r in rows]
    assert all(a < b for a, b in zip([0] + tokens, tokens))
    assert all(t % rows_per_step == 0 and t < int(r["step"]) * rows_per_step * 160 for t, r in zip(tokens, rows))
    summary = json.loads((stage_run / "summary.json").read_text())
    assert summary["tokens_seen"] == tokens[-1]


def read_metrics(run_dir):
    import csv

    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def losses(run_dir) -> torch.Tensor:
    """Step, training loss and held-out loss of every row of metrics.csv (nan where a row has none)."""
    return torch.tensor([[float(row[k] or "nan") for k in ("step", "train_loss", "val_loss")]
                         for row in read_metrics(run_dir)], dtype=torch.float64)


def test_sft_then_dpo_runs_resume_exactly_and_chat(chain, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT, run_cli

    from micro_arch.commands.run import run_experiment

    root, parent = chain
    sft_over = [f"model.init_from={parent}"]
    sft = run_experiment(root / "sft", runs_root=tmp_path / "runs", overrides=sft_over)
    assert (sft / "chat_template.json").is_file()
    assert json.loads((sft / "parent.json").read_text())["changed"]["vocab_size"] == [
        len(load_chat_tokenizer(sft).base.chars), load_chat_tokenizer(sft).vocab_size]
    rows = read_metrics(sft)
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]
    # the end-of-run sample of a chat model is its reply to the prompt as a user turn, as `chat` gives it
    from micro_arch.eval.chat import ChatSession
    from micro_arch.rundir import load_run

    (sample,) = json.loads((sft / "samples.json").read_text())
    cfg, model, _ = load_run(sft)
    s = cfg.train.sample
    expected = ChatSession(model, load_chat_tokenizer(sft), temperature=s.temperature, top_k=s.top_k,
                           max_new_tokens=s.max_new_tokens, seed=cfg.train.seed).reply(s.prompts[0])
    assert sample == {"prompt": "A", "text": expected, "as": "assistant reply"} and "<|" not in expected
    assert_tokens_count_trimmed_batches(parent, sft, rows_per_step=4)
    check_resume_is_exact(root / "sft", sft_over, sft, tmp_path / "sft-resume")

    dpo_over = [f"model.init_from={sft}"]
    dpo = run_experiment(root / "dpo", runs_root=tmp_path / "runs", overrides=dpo_over)
    rows = read_metrics(dpo)
    assert rows[0]["dpo/reward_margin"] and rows[1]["val/preference_accuracy"]
    assert_tokens_count_trimmed_batches(parent, dpo, rows_per_step=8)  # chosen and rejected rows
    check_resume_is_exact(root / "dpo", dpo_over, dpo, tmp_path / "dpo-resume")

    out = run_cli("chat", sft, "--prompt", "Who goes there?", "--prompt", "Speak!", "--max-new-tokens", "8",
                  "--system", "HORATIO answers BERNARDO.", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant: ") == 2 and "user: Speak!" in out.stdout
    interactive = subprocess.run([sys.executable, "-m", "micro_arch", "chat", str(sft), "--max-new-tokens", "4",
                                  "--device", "cpu"], input="Who goes there?\n\n", capture_output=True, text=True,
                                 timeout=300, cwd=ROOT)
    assert interactive.returncode == 0 and interactive.stdout.count("you> ") == 3, interactive.stderr  # Ctrl-D
    assert interactive.stdout.count("model> ") == 1
    with pytest.raises(MicroArchError, match="not trained with the chat template"):
        load_chat_tokenizer(parent)
    from micro_arch.eval.evaluate import evaluate_run

    with pytest.raises(MicroArchError, match="measured on held-out conversations, not text"):
        evaluate_run(sft)  # what compare calls: a stage run is left out with this line
    out = run_cli("eval", dpo, "--device", "cpu", "--batch-size", "8")
    assert out.returncode == 0, out.stderr
    result = json.loads((dpo / "stage_eval.json").read_text())
    assert result["before"]["reward_margin"] == 0 and result["after"]["pairs"] == 12


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_ddp_two_processes_equal_one_process(chain, tmp_path, stage):
    from helpers import run_cli

    from micro_arch.commands.run import run_experiment

    root, parent = chain
    start = parent
    if stage == "dpo":
        start = run_experiment(root / "sft", runs_root=tmp_path / "sft",
                               overrides=[f"model.init_from={parent}", "train.max_steps=2"])
    common = [f"model.init_from={start}", "train.max_steps=4", "model.dropout=0.0"]
    one = run_experiment(root / stage, runs_root=tmp_path / "one", overrides=common + ["train.batch_size=4"])
    result = run_cli("run", root / stage, "--nproc", "2", "--runs-dir", tmp_path / "two", "--set", *common,
                     "train.batch_size=2", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (two,) = (tmp_path / "two" / stage).iterdir()
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 2
    assert [bool(r["val_loss"]) for r in a] == [bool(r["val_loss"]) for r in b] == [False, True]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if ra[key]:
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-4), key


def test_init_from_another_architecture_is_one_line(chain, tmp_path):
    from helpers import run_cli

    root, parent = chain
    out = run_cli("run", root / "sft", "--runs-dir", tmp_path / "runs", "--set", f"model.init_from={parent}",
                  "model.d_model=48")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "d_model" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
