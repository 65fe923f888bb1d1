"""Faults a run must survive without losing anything: resuming a finished run, failed starts,
damaged checkpoints."""

import json

import pytest
import torch
from helpers import read_metrics, run_cli

from micro_arch.commands.run import run_experiment
from micro_arch.errors import MicroArchError

SHORT = ["train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4", "train.log_every=2"]


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def run_folders(root):
    return sorted(p for p in root.glob("*/*") if p.is_dir()) if root.exists() else []


def test_resuming_a_completed_run_changes_nothing_and_says_how_to_extend_it(tmp_path, capsys, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT, resume=run_dir) == run_dir
    out = capsys.readouterr().out
    assert "complete" in out and "train.max_steps=" in out and "--resume" in out
    assert snapshot(run_dir) == before


def test_a_bad_block_string_leaves_no_run_directory(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    result = run_cli("run", exp, "--runs-dir", tmp_path / "runs", "--set", "model.layers.0.spec=Norm->Atn->+")
    assert result.returncode == 2 and "Atn" in result.stderr
    assert run_folders(tmp_path / "runs") == []


def test_a_sequence_longer_than_the_held_out_split_leaves_no_run_directory(tmp_path, tiny_experiment):
    text = "\n\n".join(["To be, or not to be, that is the question. " * 40] * 9 + ["Short end."])
    (tmp_path / "corpus.txt").write_text(text)
    exp = tiny_experiment()
    with pytest.raises(MicroArchError, match="held-out split"):
        run_experiment(exp, runs_root=tmp_path / "runs", overrides=[f"data.source={tmp_path / 'corpus.txt'}"])
    assert run_folders(tmp_path / "runs") == []


def test_a_failure_after_the_start_keeps_a_folder_that_holds_checkpoints(tmp_path, tiny_experiment):
    exp = tiny_experiment()

    def fail_at_eight(step, val_loss):
        if step == 8:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT, on_eval=fail_at_eight)
    (run_dir,) = run_folders(tmp_path / "runs")
    assert (run_dir / "checkpoints/step_0000004.pt").is_file()


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys, tiny_experiment):
    exp = tiny_experiment()
    full = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT + ["train.max_steps=12"])
    reference = torch.load(full / "checkpoints/latest.pt", weights_only=True)["model"]
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    latest = run_dir / "checkpoints/latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    (run_dir / "checkpoints/step_0000008.pt").write_bytes(b"")  # the newest step file is damaged too
    (run_dir / "checkpoints/step_0000012.pt.tmp").write_bytes(b"half a save")  # a kill -9 during a save
    capsys.readouterr()
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT + ["train.max_steps=12"], resume=run_dir)
    err = capsys.readouterr().err
    assert "latest.pt" in err and "step_0000008.pt" in err and "resuming from step_0000004.pt" in err
    assert "step_0000012.pt.tmp" in err and not list(run_dir.rglob("*.tmp"))
    resumed = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)
    assert resumed["step"] == 12
    for k in reference:
        torch.testing.assert_close(resumed["model"][k], reference[k], rtol=0, atol=0)


def test_checkpoint_selects_the_checkpoint_to_resume_from(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    result = run_cli("run", exp, "--resume", run_dir, "--checkpoint", "step_0000004.pt", "--runs-dir",
                     tmp_path / "runs", "--set", *SHORT, "train.max_steps=10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 4" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["status"] == "completed"
    assert [int(r["step"]) for r in read_metrics(run_dir)] == [2, 4, 6, 8, 10]
    bad = run_cli("run", exp, "--resume", run_dir, "--checkpoint", "step_0000099.pt", "--runs-dir", tmp_path / "runs",
                  "--set", *SHORT)
    assert bad.returncode == 2 and "step_0000099.pt" in bad.stderr and "step_0000004.pt" in bad.stderr


def test_all_checkpoints_damaged_is_a_clear_error_that_removes_nothing(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    for path in (run_dir / "checkpoints").iterdir():
        path.write_bytes(path.read_bytes()[:100])
    before = snapshot(run_dir)
    with pytest.raises(MicroArchError, match="no intact checkpoint"):
        run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT + ["train.max_steps=12"], resume=run_dir)
    assert snapshot(run_dir) == before


def test_a_larger_budget_on_resume_warns_that_the_schedule_is_re_stretched(tmp_path, capsys, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    capsys.readouterr()
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT + ["train.max_steps=10"], resume=run_dir)
    err = capsys.readouterr().err
    assert "from 8 to 10 steps" in err and "cosine" in err and "from step 8" in err
    assert "max_steps: 10" in (run_dir / "config.yaml").read_text()  # the run records its new budget
