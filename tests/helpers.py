"""Shared helpers for the tests."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# gloo under this sandbox's kernel (gVisor) now and then aborts a worker with this line from libstdc++,
# in a bare init/all_gather/destroy as much as in a training run. The aborts come in bursts (twice in a
# row a few seconds apart, then none in 50 runs), so a multi-process run that ends this way is started
# again after a pause, up to GLOO_ATTEMPTS times in all.
GLOO_ABORT = "terminate called without an active exception"
GLOO_ATTEMPTS, GLOO_PAUSE_S = 3, 5.0


def _again_after_gloo_abort(run, before_retry=lambda: None):
    result = run()
    for _ in range(GLOO_ATTEMPTS - 1):
        if result.returncode == 0 or GLOO_ABORT not in result.stderr:
            break
        before_retry()
        time.sleep(GLOO_PAUSE_S)
        result = run()
    return result


def run_cli(*args, cwd=ROOT, timeout=600, env=None):
    """Run `python -m micro_arch ...` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    args = [str(a) for a in args]
    run = lambda: subprocess.run([sys.executable, "-m", "micro_arch", *args], cwd=cwd, env=full_env,  # noqa: E731
                                 capture_output=True, text=True, timeout=timeout)
    if "--nproc" not in args:
        return run()

    def forget_the_aborted_run():  # what the aborted attempt left, so the test sees one run
        if "--runs-dir" in args:
            shutil.rmtree(Path(cwd) / args[args.index("--runs-dir") + 1], ignore_errors=True)

    return _again_after_gloo_abort(run, forget_the_aborted_run)


def run_torchrun(script, *args, nproc=2, timeout=300):
    """`torchrun --standalone --nproc_per_node=N script ARGS` with the project and tests importable, one
    thread per process; started again after a GLOO_ABORT. Returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    run = lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # noqa: E731
    return _again_after_gloo_abort(run)


# The tiny experiment most tests train: 2 layers of d_model 32 on Shakespeare by character, 24 steps.
TINY = """
model:
  d_model: 32
  n_heads: 2
  max_seq_len: 32
  layers: [{spec: "Norm->Attn->+->Norm->MLP->+", repeat: 2}]
data: {source: shakespeare, tokenizer: char}
train:
  batch_size: 4
  seq_len: 32
  max_steps: 24
  warmup_steps: 4
  lr: 3.0e-3
  min_lr: 3.0e-4
  eval_every: 8
  eval_batches: 2
  log_every: 4
  checkpoint_every: 12
  sample: {prompts: ["ROMEO:"], max_new_tokens: 8}
"""


def make_experiment(tmp_path, text=TINY, name="tiny"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.yaml").write_text(textwrap.dedent(text))
    return folder


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def run_on_one_and_two_processes(exp, tmp_path, overrides):
    """The experiment run with a global batch of 8: in this process, and by `micro-arch run --nproc 2` with 4 per
    rank. Returns the two run directories."""
    from micro_arch.commands.run import run_experiment

    one = run_experiment(exp, runs_root=tmp_path / "one", overrides=overrides + ["train.batch_size=8"])
    result = run_cli("run", exp, "--nproc", "2", "--runs-dir", tmp_path / "two", "--set", *overrides,
                     "train.batch_size=4", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (two,) = (tmp_path / "two" / "tiny").iterdir()
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    return one, two


def sweep_experiment(tmp_path, lines: int = 300) -> Path:
    """tmp_path/tinyexp, a tiny experiment (d_model 16) on tmp_path/corpus.txt: `lines` numbered lines in
    documents of 20 (split at blank lines). The sweep tests' base."""
    import yaml

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" + ("\n" if i % 20 == 19 else "")
                   for i in range(lines))
    (tmp_path / "corpus.txt").write_text(text)
    exp = tmp_path / "tinyexp"
    exp.mkdir()
    (exp / "config.yaml").write_text(yaml.safe_dump({
        "model": {"d_model": 16, "n_heads": 2, "max_seq_len": 16, "layers": [{"spec": "Norm->Attn->+->Norm->MLP->+"}]},
        "data": {"source": str(tmp_path / "corpus.txt"), "tokenizer": "char"}}))
    return exp
