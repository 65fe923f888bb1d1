"""Shared helpers for the tests."""

import os
import shutil
import subprocess
import sys
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
