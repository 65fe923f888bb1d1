"""Ctrl-C during a run: a checkpoint at the current step, status "interrupted", the exact command to resume,
exit status 130, and a resumed run bit-identical to one never interrupted."""

import csv
import json
import shlex
import signal
import subprocess
import sys
import time

import torch
from helpers import ROOT, TINY, make_experiment, run_cli

PAUSE_BLOCK = '''
import time

from torch import nn

from micro_arch.model.registry import register_block


@register_block("zz_pause", kind="other")
class Pause(nn.Module):
    """The identity, slowed down while training so that a test can signal a run in the middle."""

    def __init__(self, seconds: float = 0.03):
        super().__init__()
        self.seconds = seconds

    def forward(self, x, state=None):
        if self.training:
            time.sleep(self.seconds)
        return x
'''
SETTINGS = ["model.dropout=0.1", "train.checkpoint_every=100"]


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: r[k] for k in ("step", "tokens", "train_loss", "val_loss", "lr")} for r in csv.DictReader(f)]


def test_sigint_saves_marks_interrupted_and_resumes_bit_identically(tmp_path):
    exp = make_experiment(tmp_path, TINY.replace('"Norm->Attn->+->Norm->MLP->+"', '"Norm->Attn->+->Norm->MLP->+->zz_pause"'),
                          name="pausing")
    (exp / "blocks.py").write_text(PAUSE_BLOCK)
    reference = run_cli("run", exp, "--runs-dir", tmp_path / "reference", "--set", *SETTINGS)
    assert reference.returncode == 0, reference.stderr[-2000:]
    (full,) = (tmp_path / "reference" / "pausing").iterdir()

    process = subprocess.Popen([sys.executable, "-m", "micro_arch", "run", str(exp), "--runs-dir",
                                str(tmp_path / "runs"), "--set", *SETTINGS], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("pausing/*/metrics.csv")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    (run_dir,) = (tmp_path / "runs" / "pausing").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 4 <= summary["steps"] < 24, summary
    assert summary["pid"] == process.pid and summary["updated_at"]
    saved = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)
    assert saved["step"] == summary["steps"] and (run_dir / f"checkpoints/step_{summary['steps']:07d}.pt").is_file()

    command = shlex.split(out.split("Resume with:")[1].strip().splitlines()[0])
    assert command[:2] == ["micro-arch", "run"] and str(run_dir) in command
    resumed = run_cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert metrics(run_dir) == metrics(full)  # every logged number, as written
    a = torch.load(full / "checkpoints/latest.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
