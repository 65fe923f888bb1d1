"""Shared helpers for the tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# gloo under this sandbox's kernel (gVisor) now and then aborts a worker with this line from libstdc++,
# in a bare init/all_gather/destroy as much as in a training run; seen 3 times in about 40 runs, a few
# minutes apart, and never on a rerun. A multi-process run that ends this way is started once more.
GLOO_ABORT = "terminate called without an active exception"


def run_cli(*args, cwd=ROOT, timeout=600, env=None):
    """Run `python -m micro_arch ...` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    args = [str(a) for a in args]
    run = lambda: subprocess.run([sys.executable, "-m", "micro_arch", *args], cwd=cwd, env=full_env,  # noqa: E731
                                 capture_output=True, text=True, timeout=timeout)
    result = run()
    if result.returncode != 0 and "--nproc" in args and GLOO_ABORT in result.stderr:
        if "--runs-dir" in args:  # what the aborted attempt left, so the test sees one run
            shutil.rmtree(Path(cwd) / args[args.index("--runs-dir") + 1], ignore_errors=True)
        result = run()
    return result


def run_torchrun(script, *args, nproc=2, timeout=300):
    """`torchrun --standalone --nproc_per_node=N script ARGS` with the project and tests importable, one
    thread per process; started once more after a GLOO_ABORT. Returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    run = lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # noqa: E731
    result = run()
    if result.returncode != 0 and GLOO_ABORT in result.stderr:
        result = run()
    return result
