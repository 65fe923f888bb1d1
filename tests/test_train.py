"""The trainer end to end: run directories, exact resume, DDP equals one process, bad input."""

import json
import os
import shutil

import pytest
import torch
from helpers import TINY, make_experiment, read_metrics, run_cli, run_on_one_and_two_processes

from micro_arch.commands.run import run_experiment
from micro_arch.config import TrainConfig
from micro_arch.errors import MicroArchError
from micro_arch.train.optim import lr_factor


def test_run_leaves_a_complete_run_directory(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs")
    for name in ("config.yaml", "model_config.json", "train_config.json", "data_config.json", "metrics.csv",
                 "summary.json", "samples.json", "trace.txt", "checkpoints/latest.pt",
                 "checkpoints/step_0000012.pt", "checkpoints/step_0000024.pt"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir)
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True, False, True]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 24
    assert summary["tokens_seen"] == 24 * 4 * 32
    assert summary["load_average"] >= 0 and summary["cpu_count"] == os.cpu_count()  # for compare's fairness
    assert summary["final_val_loss"] == pytest.approx(float(rows[-1]["val_loss"]))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns
    # a second run never reuses the first one's directory
    second = run_experiment(exp, runs_root=tmp_path / "runs", overrides=["train.max_steps=4"])
    assert second != run_dir and (run_dir / "summary.json").read_text() == json.dumps(summary, indent=2) + "\n"


SCALED_TANH = '''
import torch
from torch import nn

from micro_arch.model.registry import register_block


@register_block("zz_own_scaled_tanh", kind="other")
class ScaledTanh(nn.Module):
    def __init__(self, d_model: int, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((d_model,), init))

    def forward(self, x, state=None):
        return torch.tanh(x) * self.scale
'''


def test_runs_of_an_experiment_with_its_own_blocks_are_evaluated_and_compared_from_their_folders(tmp_path):
    spec = '"Norm->Attn->+->Norm->MLP->zz_own_scaled_tanh(init=0.5)->+"'
    exp = make_experiment(tmp_path, TINY.replace('"Norm->Attn->+->Norm->MLP->+"', spec), name="own-blocks")
    (exp / "blocks.py").write_text(SCALED_TANH)
    for seed in (1, 2):
        trained = run_cli("run", exp, "--runs-dir", tmp_path / "runs", "--set", "train.max_steps=2",
                          "train.sample.max_new_tokens=2", f"train.seed={seed}")
        assert trained.returncode == 0, trained.stderr[-2000:]
    runs = sorted((tmp_path / "runs" / "own-blocks").iterdir())
    shutil.rmtree(exp)  # from here on, only the run directories
    text = tmp_path / "other.txt"
    text.write_text("ROMEO: Is the day so young?\n" * 40)
    for args in (["eval", runs[0], "--max-batches", "1"], ["generate", runs[0], "--max-new-tokens", "4"],
                 ["compare", *runs, "--data", text, "--out", tmp_path / "report"]):  # two copies in one process
        result = run_cli(*args)
        assert result.returncode == 0, (args[0], result.stderr[-2000:])
    ranked = json.loads((tmp_path / "report" / "data_ranking.json").read_text())
    assert sorted(r["run"] for r in ranked) == [str(r) for r in runs]


def test_an_experiment_that_extends_one_with_its_own_blocks_trains_and_evaluates(tmp_path):
    """The parent's blocks.py is loaded for the child (whose own blocks.py, if any, is loaded too), and the
    run keeps a copy of both: eval works after both experiment folders are gone."""
    spec = '"Norm->Attn->+->Norm->MLP->zz_own_scaled_tanh(init=0.5)->+"'
    parent = make_experiment(tmp_path, TINY.replace('"Norm->Attn->+->Norm->MLP->+"', spec), name="base")
    (parent / "blocks.py").write_text(SCALED_TANH)
    child = make_experiment(tmp_path, "extends: ../base/config.yaml\nmodel: {d_model: 16}\n", name="child")
    (child / "blocks.py").write_text(SCALED_TANH.replace("zz_own_scaled_tanh", "zz_child_tanh"))
    trained = run_cli("run", child, "--runs-dir", tmp_path / "runs", "--set", "train.max_steps=2",
                      "train.sample.max_new_tokens=2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "child").iterdir()
    assert (run / "blocks-extends-0.py").read_text() == SCALED_TANH
    assert "zz_child_tanh" in (run / "blocks.py").read_text()
    shutil.rmtree(parent)
    shutil.rmtree(child)
    result = run_cli("eval", run, "--max-batches", "1")
    assert result.returncode == 0, result.stderr[-2000:]


def test_resume_matches_the_uninterrupted_run(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    full = run_experiment(exp, runs_root=tmp_path / "runs", overrides=["model.dropout=0.1"])
    # The state a run killed after step 12 leaves behind: its checkpoint at 12 is the latest.
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    shutil.copy(stopped / "checkpoints/step_0000012.pt", stopped / "checkpoints/latest.pt")
    (stopped / "checkpoints/step_0000024.pt").unlink()
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=["model.dropout=0.1"], resume=stopped)
    a, b = read_metrics(full), read_metrics(stopped)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "lr", "tokens"):
            if ra[key]:
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-5, abs=1e-6), (ra["step"], key)
    sa = torch.load(full / "checkpoints/latest.pt", weights_only=True)["model"]
    sb = torch.load(stopped / "checkpoints/latest.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


# The MoE layer without the Switch loss: that loss is computed per rank from local routing counts, so
# with it N processes are not one process (by design, as in every data-parallel MoE).
@pytest.mark.parametrize("spec", ["Norm->Attn->+->Norm->MLP->+",
                                  "Norm->Attn->+->Norm->MoE(n_experts=4, aux_loss_coef=0)->+"],
                         ids=["dense", "moe"])
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, spec):
    exp = make_experiment(tmp_path, TINY.replace("Norm->Attn->+->Norm->MLP->+", spec))
    common = ["train.max_steps=8", "train.log_every=2", "train.eval_every=4", "train.checkpoint_every=8"]
    one, two = run_on_one_and_two_processes(exp, tmp_path, common)
    a, b = read_metrics(one), read_metrics(two)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert float(rb["train_loss"]) == pytest.approx(float(ra["train_loss"]), rel=1e-4)
        if ra["val_loss"]:
            assert float(rb["val_loss"]) == pytest.approx(float(ra["val_loss"]), rel=1e-4)


def test_muon_and_schedules_train(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    for schedule in ("wsd", "constant"):
        run_dir = run_experiment(exp, runs_root=tmp_path / "runs",
                                 overrides=["train.optimizer=muon", f"train.schedule={schedule}", "train.max_steps=12",
                                            "train.grad_accum=2"])
        rows = read_metrics(run_dir)
        assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.55)  # cosine halfway: (1 + 0.1) / 2
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    cfg.schedule, cfg.decay_fraction = "wsd", 0.2
    assert lr_factor(87, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(99, cfg, 110) == pytest.approx(1.0 - 0.9 * 11 / 22)
    cfg.schedule = "constant"
    assert lr_factor(100, cfg, 110) == 1.0


def test_dry_run_prints_the_plan(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    result = run_cli("run", exp, "--dry-run", "--runs-dir", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    for text in ("parameters", "without embeddings", "FLOPs per token", "tokens per non-embedding parameter",
                 "peak memory"):
        assert text in result.stdout
    assert not (tmp_path / "runs").exists()
    printed = " ".join(result.stdout.split())
    non_embedding = int(printed.split(" without embeddings")[0].split("(")[-1].replace(",", ""))
    ratio = float(printed.split("tokens (")[1].split(" tokens per non-embedding parameter")[0])
    assert ratio == pytest.approx(24 * 4 * 32 / non_embedding, rel=0.05)  # TINY's tokens, two digits


def test_dry_run_of_a_billion_parameter_model_allocates_no_weights(tmp_path, tiny_experiment):
    """d_model 2048 x 24 layers is 1.2B parameters, 4.8 GB in fp32: the plan must not build them."""
    import subprocess
    import sys

    exp = tiny_experiment()
    code = ("import resource, sys; from micro_arch.cli import main; sys.argv = ['micro-arch'] + sys.argv[1:]\n"
            "try:\n    main()\nfinally:\n"
            "    print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run(
        [sys.executable, "-c", code, "run", str(exp), "--dry-run", "--set", "model.d_model=2048", "model.n_heads=16",
         "model.layers.0.repeat=24", "train.batch_size=1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1,2" in result.stdout.split("parameters")[1][:20]  # 1.2B parameters reported
    maxrss_mb = int(result.stdout.rsplit("maxrss_kb", 1)[1]) / 1024
    assert maxrss_mb < 2000, f"dry run used {maxrss_mb:.0f} MB"


@pytest.mark.parametrize("override, message", [
    (["data.source=/no/such/file.txt"], "/no/such/file.txt"),
    (["train.seq_len=64"], "max_seq_len"),
    (["model.vocab_size=10"], "vocab_size"),
    (["train.optimizer=sgd"], "optimizer"),
])
def test_bad_input_stops_with_a_message(tmp_path, override, message, tiny_experiment):
    exp = tiny_experiment()
    result = run_cli("run", exp, "--runs-dir", tmp_path / "runs", "--set", *override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_resuming_with_another_number_of_processes_warns_that_the_global_batch_changes(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    first = run_cli("run", exp, "--nproc", "2", "--runs-dir", tmp_path / "runs", "--set", "train.max_steps=4",
                    env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    resumed = run_cli("run", exp, "--resume", run_dir, "--set", "train.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = " ".join(resumed.stderr.split())
    assert "trained with 2 process(es) and resumes with 1" in warning, warning
    assert "global batch changes from 8 to 4 sequences per step at step 4" in warning, warning
    # a finished run's advice to train further keeps the number of processes it is given
    done = run_cli("run", exp, "--nproc", "2", "--resume", run_dir, "--set", "train.max_steps=6",
                   env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "this run is complete" in done.stdout, done.stderr[-3000:]
    assert "--nproc 2" in done.stdout.split("resume with a larger train.max_steps")[1], done.stdout


def test_resume_refuses_corrupt_checkpoints_and_other_configs(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=["train.max_steps=4"])
    with pytest.raises(MicroArchError, match="--set model.d_model=64: the run has 32.*leave those --set out"):
        run_experiment(exp, runs_root=tmp_path / "runs", overrides=["model.d_model=64"], resume=run_dir)
    # without it, the run resumes with its own settings (its config.yaml), whatever the experiment says
    assert run_experiment(exp, runs_root=tmp_path / "runs", resume=run_dir) == run_dir
    for name in ("latest.pt", "step_0000004.pt"):  # with one intact, resume would fall back to it
        path = run_dir / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:1000])
    before = sorted(p.name for p in run_dir.rglob("*"))
    result = run_cli("run", exp, "--resume", run_dir, "--runs-dir", tmp_path / "runs", "--set", "train.max_steps=8")
    assert result.returncode == 2 and "corrupt or truncated" in result.stderr and "latest.pt" in result.stderr
    assert "no intact checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_a_run_with_relative_data_paths_evaluates_from_another_folder(tmp_path, monkeypatch):
    """data.source relative to the folder the run started in (as the shipped SFT/DPO experiments have it):
    eval, generate and compare from elsewhere find it there, and evaluate on the same text."""
    from micro_arch.eval.evaluate import evaluate_run
    from micro_arch.rundir import read_run_config

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "text.txt").write_text("ROMEO: To be, or not to be, that is the question.\n\n" * 60)
    make_experiment(project, TINY.replace("source: shakespeare", "source: data/text.txt"))
    monkeypatch.chdir(project)
    run_dir = run_experiment("tiny", runs_root=project / "runs", overrides=["train.max_steps=8"])
    here = evaluate_run(run_dir, max_batches=2, device="cpu")
    assert json.loads((run_dir / "summary.json").read_text())["started_in"] == str(project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_run_config(run_dir).data.source == "data/text.txt"  # config.yaml itself is unchanged
    there = evaluate_run(run_dir, max_batches=2, device="cpu")
    assert there["val_loss"] == here["val_loss"] and there["data_fingerprint"] == here["data_fingerprint"]
    out = run_cli("compare", run_dir, "--out", elsewhere / "report", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert "no such file" not in out.stdout + out.stderr
