"""A run's life from start to report, when things go wrong (issue 25): a loss that turns NaN, a resume that must not
overwrite a finished run, two trainers on one folder, names and prompts checked before training, checkpoints of
another model, a double Ctrl-C, messages that point the right way and advice that works."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, TINY, make_experiment, read_metrics, run_cli

from micro_arch.commands.run import check_resumable, run_experiment
from micro_arch.errors import MicroArchError
from micro_arch.rundir import read_run_config
from micro_arch.train.divergence import RunDiverged
from micro_arch.train.runlock import RunLock

SHORT = ["train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4", "train.log_every=2"]

NAN_BLOCK = '''
from torch import nn

from micro_arch.model.registry import register_block


@register_block("zz_nan_after", kind="other")
class NanAfter(nn.Module):
    """The identity, except that from its (steps+1)-th training forward on it returns NaN: a run that diverges
    on cue, whatever the optimizer's numerics."""

    def __init__(self, steps: int = 5):
        super().__init__()
        self.steps, self.calls = steps, 0

    def forward(self, x, state=None):
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                return x * float("nan")
        return x
'''

SLOW_BLOCK = '''
import os
import time

from torch import nn

from micro_arch.model.registry import register_block


@register_block("zz_slow", kind="other")
class Slow(nn.Module):
    """The identity, slowed down while training by $SLOW_S seconds, so that a test can act on a running trainer."""

    def forward(self, x, state=None):
        if self.training:
            time.sleep(float(os.environ.get("SLOW_S", "0")))
        return x
'''


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def run_folders(root):
    return sorted(p for p in root.glob("*/*") if p.is_dir()) if root.exists() else []


# --- 1. a loss that turns NaN -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A run whose loss turns NaN at step 6 (checkpoints at 4 and 8, log rows every 2 steps; the trace at the start
    is the block's first training forward) and a healthy run."""
    tmp = tmp_path_factory.mktemp("diverged")
    exp = make_experiment(tmp, TINY.replace('"Norm->Attn->+->Norm->MLP->+"',
                                            '"Norm->Attn->+->Norm->MLP->+->zz_nan_after(steps=6)"'), name="nanny")
    (exp / "blocks.py").write_text(NAN_BLOCK)
    with pytest.raises(RunDiverged) as stopped:
        run_experiment(exp, runs_root=tmp / "runs", overrides=SHORT)
    (run_dir,) = run_folders(tmp / "runs")
    healthy = run_experiment(make_experiment(tmp), runs_root=tmp / "runs", overrides=SHORT)
    return run_dir, healthy, str(stopped.value), tmp


def test_a_run_whose_loss_turns_nan_stops_as_diverged_and_keeps_its_last_finite_checkpoint(diverged):
    run_dir, _, message, _ = diverged
    summary = summary_of(run_dir)
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 6 and summary["steps"] == 6
    assert summary["last_finite_checkpoint"] == "checkpoints/step_0000004.pt"
    rows = read_metrics(run_dir)
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and rows[-1]["train_loss"] == "nan"  # stopped at its log row
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.pt", "step_0000004.pt"]
    latest = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)
    assert latest["step"] == 4 and all(torch.isfinite(v).all() for v in latest["model"].values())
    assert "diverged" in message and "at step 6" in message and "step_0000004.pt" in message
    assert "train.lr=0.003" in message and "\n" not in message  # the likely causes, on one line
    assert summary["error"] == message
    with pytest.raises(MicroArchError, match="diverged at step 6.*would diverge again"):
        run_experiment(run_dir.parents[2] / "nanny", resume=run_dir, overrides=["train.max_steps=10"])


def test_generate_eval_and_compare_treat_a_diverged_run_as_diverged(diverged, capsys):
    from micro_arch.commands.evaluate import eval_command
    from micro_arch.commands.generate import generate_command
    from micro_arch.report.compare import compare

    run_dir, healthy, _, tmp = diverged
    capsys.readouterr()
    generate_command(run_dir, ["ROMEO:"], max_new_tokens=4, device="cpu")  # from the last finite checkpoint
    assert "diverged at step 6" in " ".join(capsys.readouterr().out.split())
    eval_command(run_dir, max_batches=2, device="cpu")
    assert math.isfinite(json.loads((run_dir / "eval.json").read_text())["val_loss"])
    with pytest.raises(MicroArchError, match="none of the 1 run directories"):
        compare([run_dir], tmp / "only-diverged", max_batches=2, device="cpu")
    assert "diverged at step 6" in " ".join(capsys.readouterr().out.split())
    assert not (tmp / "only-diverged").exists()
    folder = compare([healthy, run_dir], tmp / "report", max_batches=2, device="cpu")
    report = (folder / "report.md").read_text()
    assert "diverged at step 6" in report and "not ranked" in report
    assert "1 run(s) compared, 1 left out" in report
    from micro_arch.eval.text import compare_on_data

    (tmp / "other.txt").write_text("ROMEO: to be, or not to be, that is the question.\n" * 20)
    capsys.readouterr()
    rows = compare_on_data([healthy, run_dir], str(tmp / "other.txt"), max_batches=2, device="cpu")
    assert [r["run"] for r in rows] == [str(healthy)]
    assert "diverged at step 6" in " ".join(capsys.readouterr().out.split())


def test_a_run_that_is_nan_from_its_first_step_blames_the_model_not_the_learning_rate(tmp_path):
    exp = make_experiment(tmp_path, TINY.replace('"Norm->Attn->+->Norm->MLP->+"',
                                                 '"Norm->Attn->+->Norm->MLP->+->zz_nan_after(steps=0)"'), name="nanny")
    (exp / "blocks.py").write_text(NAN_BLOCK)
    with pytest.raises(RunDiverged, match="before any update.*block argument") as stopped:
        run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    assert "learning rate is too high" not in str(stopped.value)
    (run_dir,) = run_folders(tmp_path / "runs")  # kept: its record says what happened
    summary = summary_of(run_dir)
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 1 and summary["steps"] == 2
    assert summary["last_finite_checkpoint"] is None and not (run_dir / "checkpoints").exists()
    result = run_cli("generate", run_dir, "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 2 and "diverged at step 1 before its first checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_huge_learning_rate_without_clipping_diverges_and_names_both(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    with pytest.raises(RunDiverged) as stopped:
        run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT + ["train.lr=1e6", "train.grad_clip=null"])
    assert "train.lr=1e+06" in str(stopped.value) and "train.grad_clip=1.0" in str(stopped.value)
    (run_dir,) = run_folders(tmp_path / "runs")
    summary = summary_of(run_dir)
    assert summary["status"] == "diverged" and summary["steps"] <= 8
    for name in (summary["last_finite_checkpoint"], "checkpoints/latest.pt") if summary["last_finite_checkpoint"] else ():
        saved = torch.load(run_dir / name, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in saved.values()), name


def test_the_finite_watch_keeps_the_first_bad_step_of_a_loss_or_a_gradient_norm():
    from micro_arch.train.distributed import Dist
    from micro_arch.train.divergence import FiniteWatch, weights_finite

    watch = FiniteWatch(torch.device("cpu"), Dist())
    watch.add(1, torch.tensor(2.5), None)
    watch.add(2, torch.tensor(2.4), torch.tensor(0.7))
    assert watch.first_bad_step() is None
    watch.add(3, torch.tensor(2.3), torch.tensor(float("inf")))  # a finite loss, an overflowing gradient
    watch.add(4, torch.tensor(float("nan")), torch.tensor(float("nan")))
    assert watch.first_bad_step() == 3
    model = torch.nn.Linear(3, 2)
    assert weights_finite(model, Dist())
    with torch.no_grad():
        model.bias[1] = float("-inf")
    assert not weights_finite(model, Dist())


def test_a_ddp_run_that_diverges_stops_every_rank_at_one_step_and_says_it_once(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    result = run_cli("run", exp, "--nproc", "2", "--runs-dir", tmp_path / "runs", "--set", *SHORT, "train.lr=1e6",
                     "train.grad_clip=null", "train.log_every=1", "train.checkpoint_every=2",
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and result.stderr.count("the run diverged") == 1, result.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path / "runs")
    summary = summary_of(run_dir)
    assert summary["status"] == "diverged" and summary["world_size"] == 2
    assert int(read_metrics(run_dir)[-1]["step"]) == summary["steps"] == summary["diverged_at_step"]
    assert (run_dir / "run.lock").read_text() == ""


def test_a_checkpoint_of_nan_weights_is_refused_in_one_line_and_compare_leaves_it_out(diverged, tmp_path):
    """A run trained before divergence was caught: 'completed', with NaN weights and a NaN final loss."""
    from micro_arch.report.compare import compare
    from micro_arch.report.fairness import standard_error

    _, healthy, _, _ = diverged
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in healthy.rglob("*"):
        if path.is_file() and path.name != "eval.json":
            target = broken / path.relative_to(healthy)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    payload = torch.load(broken / "checkpoints/latest.pt", weights_only=True)
    payload["model"] = {k: v * float("nan") for k, v in payload["model"].items()}
    torch.save(payload, broken / "checkpoints/latest.pt")
    result = run_cli("generate", broken, "--max-new-tokens", "4", "--device", "cpu")
    assert result.returncode == 2 and "not finite" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(MicroArchError, match="none of the 1"):
        compare([broken], tmp_path / "report", max_batches=2, device="cpu")
    assert not (tmp_path / "report").exists()
    assert standard_error([float("nan"), 1.0, 2.0]) is None and standard_error([1.0, 3.0]) == pytest.approx(1.0)


# --- 2. resuming a finished run -----------------------------------------------------------------------


def test_resuming_a_finished_run_without_set_keeps_it_byte_identical(tmp_path, capsys, tiny_experiment):
    exp = tiny_experiment()  # the experiment says 24 steps; the run was started with 8
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert run_experiment(exp, runs_root=tmp_path / "runs", resume=run_dir) == run_dir
    out, err = capsys.readouterr()
    assert "this run is complete (8 of 8 steps)" in " ".join(out.split())
    assert "train.max_steps: 8 in the run, 24 in" in " ".join(err.split())  # what it did not take, said
    assert snapshot(run_dir) == before
    # an explicit --set extends it, and says so; the finished state stays in its step file
    run_experiment(exp, runs_root=tmp_path / "runs", resume=run_dir, overrides=["train.max_steps=10"])
    out = " ".join(capsys.readouterr().out.split())
    assert "extending the completed run from 8 to 10 steps" in out and "step_0000008.pt" in out
    assert (run_dir / "checkpoints/step_0000008.pt").read_bytes() == before["checkpoints/step_0000008.pt"]
    assert summary_of(run_dir)["steps"] == 10 and "max_steps: 10" in (run_dir / "config.yaml").read_text()


# --- 3. one trainer per run folder --------------------------------------------------------------------


def test_a_second_trainer_is_refused_while_the_first_runs_and_allowed_after_a_kill(tmp_path):
    exp = make_experiment(tmp_path, TINY.replace('"Norm->Attn->+->Norm->MLP->+"', '"Norm->Attn->+->Norm->MLP->+->zz_slow"'),
                          name="slow")
    (exp / "blocks.py").write_text(SLOW_BLOCK)
    settings = ["train.max_steps=400", "train.checkpoint_every=2", "train.log_every=2", "train.eval_every=400"]
    env = {**os.environ, "SLOW_S": "0.1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "micro_arch", "run", str(exp), "--runs-dir", str(tmp_path / "runs"),
                              "--set", *settings], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "runs").glob("slow/*/checkpoints/step_*.pt")) and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        (run_dir,) = run_folders(tmp_path / "runs")
        second = run_cli("run", exp, "--resume", run_dir, "--set", *settings, env={"SLOW_S": "0"})
        assert first.poll() is None  # the first was still running when the second was refused
        assert second.returncode == 2 and "Traceback" not in second.stderr
        line = second.stderr.strip()
        assert "\n" not in line and f"pid {first.pid} on host {socket.gethostname()}" in line, line
        assert "another trainer" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    reached = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)["step"]
    third = run_cli("run", exp, "--resume", run_dir, "--set", *settings[1:], f"train.max_steps={reached + 2}",
                    env={"SLOW_S": "0"})
    assert third.returncode == 0, third.stderr[-2000:]
    assert summary_of(run_dir)["status"] == "completed" and summary_of(run_dir)["steps"] == reached + 2
    assert (run_dir / "run.lock").read_text() == ""  # released: nobody holds it


def test_the_lock_names_its_holder_and_the_launcher_checks_it_before_starting_workers(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=["train.max_steps=4"])
    held = RunLock(run_dir)
    held.acquire()
    try:
        with pytest.raises(MicroArchError, match=f"pid {os.getpid()} on host"):
            RunLock(run_dir).acquire()
        with pytest.raises(MicroArchError, match="another trainer"):  # refused before torchrun starts
            run_experiment(exp, runs_root=tmp_path / "runs", resume=run_dir, nproc=2,
                           overrides=["train.max_steps=6"])
    finally:
        held.release()
    again = RunLock(run_dir)
    again.acquire()
    again.release()


# --- 4, 5. a name that escapes, a prompt the tokenizer cannot encode ------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "/abs/path", "..", "a/b"])
def test_a_run_name_is_one_folder_name(tmp_path, name, tiny_experiment):
    exp = tiny_experiment()
    with pytest.raises(MicroArchError, match=r"--set name=.*one folder name") as refused:
        run_experiment(exp, runs_root=tmp_path / "runs" / "inner", overrides=["train.max_steps=2", f"name={name}"])
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # nothing created anywhere


def test_sample_prompts_the_tokenizer_cannot_encode_stop_the_run_before_its_first_step(tmp_path, tiny_experiment):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n\n" * 400)
    exp = tiny_experiment()
    with pytest.raises(MicroArchError, match=r"train.sample.prompts: prompt 'ROMEO:' cannot be encoded.*'.*EMO"):
        run_experiment(exp, runs_root=tmp_path / "runs", overrides=[f"data.source={tmp_path / 'corpus.txt'}"])
    assert run_folders(tmp_path / "runs") == []


# --- 8. a checkpoint of another configuration ---------------------------------------------------------


def test_resuming_from_a_checkpoint_of_another_model_is_one_line(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    other = run_experiment(exp, runs_root=tmp_path / "other", overrides=["train.max_steps=4", "model.d_model=64"])
    result = run_cli("run", exp, "--resume", run_dir, "--checkpoint", other / "checkpoints/latest.pt",
                     "--set", "train.max_steps=12")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "size mismatch" not in result.stderr
    assert "another model (model.d_model is 64 there, 32 in" in result.stderr
    (run_dir / "checkpoints/latest.pt").write_bytes((other / "checkpoints/latest.pt").read_bytes())  # copied in
    with pytest.raises(MicroArchError, match=r"latest.pt: a checkpoint of another model .*remove"):
        run_experiment(exp, runs_root=tmp_path / "runs", resume=run_dir, overrides=["train.max_steps=12"])


# --- 11. a double Ctrl-C before the first checkpoint --------------------------------------------------


def test_a_double_ctrl_c_before_the_first_checkpoint_leaves_no_folder_to_resume(tmp_path):
    exp = make_experiment(tmp_path, TINY.replace('"Norm->Attn->+->Norm->MLP->+"', '"Norm->Attn->+->Norm->MLP->+->zz_slow"'),
                          name="slow")
    (exp / "blocks.py").write_text(SLOW_BLOCK)
    env = {**os.environ, "SLOW_S": "0.2", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "micro_arch", "run", str(exp), "--runs-dir", str(tmp_path / "runs"),
                                "--set", "train.checkpoint_every=1000", "train.max_steps=1000", "train.log_every=1"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("slow/*/metrics.csv")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    while "SIGINT" not in process.stderr.readline():  # the first is handled (two at once would be one signal)
        assert process.poll() is None
    process.send_signal(signal.SIGINT)  # a step takes 0.4 s: this one comes before the step ends and it saves
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert run_folders(tmp_path / "runs") == [], err[-2000:]


def test_an_unfinished_run_without_a_checkpoint_is_not_advised_to_resume(tmp_path):
    from micro_arch.report.runs import run_state

    run_dir = tmp_path / "runs/tiny/x"
    run_dir.mkdir(parents=True)
    command = f"micro-arch run experiments/tiny --resume {run_dir} --set train.max_steps=9"
    for status in ("stopped", "interrupted"):
        words = run_state(run_dir, {"status": status, "steps": 3, "resume_command": command})
        assert "cannot be resumed" in words and "`micro-arch run experiments/tiny --set train.max_steps=9`" in words
    dead = {"status": "running", "steps": 3, "resume_command": command, "pid": 2 ** 22 + 7,
            "host": socket.gethostname()}
    assert "cannot be resumed" in run_state(run_dir, dead)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints/latest.pt").write_bytes(b"x")
    assert "resume it with" in run_state(run_dir, {"status": "interrupted", "steps": 3, "resume_command": command})


# --- 13. messages that point the right way ------------------------------------------------------------


def test_chat_of_a_missing_folder_and_resume_of_a_file_say_what_they_are(tmp_path, tiny_experiment):
    from micro_arch.commands.chat import chat_command

    with pytest.raises(MicroArchError, match="no such run directory"):
        chat_command(tmp_path / "nowhere", ["hi"], device="cpu")
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=["train.max_steps=4"])
    with pytest.raises(MicroArchError, match=rf"a file, not a run directory.*--resume {run_dir} --checkpoint latest.pt"):
        run_experiment(exp, resume=run_dir / "checkpoints/latest.pt")
    with pytest.raises(MicroArchError, match="no such run directory"):
        run_experiment(exp, resume=tmp_path / "nowhere")


# --- 14. advice that works ----------------------------------------------------------------------------


def test_a_dpo_resume_may_name_the_parents_checkpoint_of_the_step_it_began_from(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    parent = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    child = run_experiment(exp, runs_root=tmp_path / "runs", overrides=["train.max_steps=2"])
    (child / "parent.json").write_text(json.dumps({"type": "micro-arch run", "path": str(parent.resolve()), "step": 4}))
    cfg = read_run_config(child)
    cfg.model.init_from = str(parent / "checkpoints/step_0000004.pt")  # what the advice says to --set
    check_resumable(child, cfg, [f"model.init_from={cfg.model.init_from}"])
    cfg.model.init_from = str(parent / "checkpoints/step_0000008.pt")  # other weights: still refused
    with pytest.raises(MicroArchError, match="model.init_from"):
        check_resumable(child, cfg, [f"model.init_from={cfg.model.init_from}"])


def test_init_from_a_run_with_a_truncated_latest_checkpoint_advises_a_setting_that_works(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    parent = run_experiment(exp, runs_root=tmp_path / "runs", overrides=SHORT)
    latest = parent / "checkpoints/latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    (parent / "checkpoints/step_0000008.pt").write_bytes(b"")
    with pytest.raises(MicroArchError, match="corrupt or truncated") as refused:
        run_experiment(exp, runs_root=tmp_path / "child", overrides=["train.max_steps=2", f"model.init_from={parent}"])
    message = str(refused.value)
    assert "--checkpoint" not in message and "--set model.init_from=" in message
    advised = message.split("--set ")[1].split()[0]
    assert advised.endswith("step_0000004.pt")
    child = run_experiment(exp, runs_root=tmp_path / "child", overrides=["train.max_steps=2", advised])
    assert json.loads((child / "parent.json").read_text())["step"] == 4


def test_a_dpo_resume_after_its_parent_trained_on_follows_the_advice_to_the_end(chain, tmp_path):
    import shutil

    from micro_arch.rundir import read_summary

    root, trained = chain
    parent = tmp_path / "parent"
    shutil.copytree(trained, parent)  # the shared parent stays as it is
    dpo = run_experiment(root / "dpo", runs_root=tmp_path / "runs", overrides=[f"model.init_from={parent}",
                                                                               "train.max_steps=4"])
    run_experiment(root / "pretrain", resume=parent, overrides=["train.max_steps=12"])  # the parent trains on
    with pytest.raises(MicroArchError, match="began from step 8") as refused:
        run_experiment(root / "dpo", resume=dpo, overrides=["train.max_steps=6"])
    advised = str(refused.value).split("resume with --set ")[1].split()[0]
    assert advised == f"model.init_from={parent / 'checkpoints/step_0000008.pt'}"
    run_experiment(root / "dpo", resume=dpo, overrides=["train.max_steps=6", advised])
    assert read_summary(dpo)["status"] == "completed" and read_summary(dpo)["steps"] == 6
