"""A short training run of every shipped experiment, in one process: does each one train on this machine,
in this precision? One line per experiment (ok or the error, seconds, last train and held-out loss);
the exit status is the number of failures.

SFT and DPO experiments start from the shakespeare-char smoke run (model.init_from) and read their built-in
dialogue data (shakespeare-chat:*, made from the plays into the cache on first use).

    python bench/smoke_experiments.py --device cuda --precision bf16 --out /tmp/smoke
    python bench/smoke_experiments.py --steps 2 --only shakespeare-char gpt2      # a CPU check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_of(folder: Path) -> str:
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    return (cfg.get("train") or {}).get("stage", "pretrain")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="runs go here (default: a temporary folder)")
    parser.add_argument("--only", nargs="+", default=None, help="experiment names to run (default: all)")
    args = parser.parse_args()

    import tempfile

    from micro_arch.commands import run as train
    from micro_arch.commands.run import run_experiment
    from micro_arch.train import bookkeeping

    bookkeeping.console.quiet = train.console.quiet = True
    out = Path(args.out or tempfile.mkdtemp(prefix="smoke-"))
    folders = sorted(p for p in (ROOT / "experiments").iterdir() if (p / "config.yaml").is_file())
    if args.only:
        folders = [p for p in folders if p.name in args.only]
    folders.sort(key=lambda p: stage_of(p) != "pretrain")  # the stages start from a pretrain run
    common = [f"train.max_steps={args.steps}", f"train.log_every={max(1, args.steps // 4)}",
              f"train.eval_every={args.steps}", "train.eval_batches=2", f"train.checkpoint_every={args.steps}",
              f"train.precision={args.precision}", f"train.device={args.device}", "train.sample.max_new_tokens=16"]
    parent, failures, ok, skipped = None, 0, 0, 0
    for folder in folders:
        extra, stage = [], stage_of(folder)
        start = time.perf_counter()
        try:
            if stage != "pretrain":
                if parent is None:
                    print(f"{folder.name:18s} skipped: needs the shakespeare-char smoke run")
                    skipped += 1
                    continue
                extra = [f"model.init_from={parent}"]
            run_dir = run_experiment(folder, overrides=common + extra, runs_root=out / "runs")
            summary = json.loads((run_dir / "summary.json").read_text())
            if folder.name == "shakespeare-char":
                parent = run_dir
            ok += 1
            print(f"{folder.name:18s} ok      {time.perf_counter() - start:6.1f} s  held-out "
                  f"{summary['final_val_loss']:.3f}  {summary['tokens_per_sec'] or 0:,.0f} tok/s  "
                  f"compile/first step {summary['compile_time_s']:.1f} s", flush=True)
        except Exception as err:  # report and go on: the point is to see every experiment
            failures += 1
            print(f"{folder.name:18s} FAILED  {time.perf_counter() - start:6.1f} s  {type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}", flush=True)
    print(f"{ok} of {len(folders)} experiments trained, {failures} failed, {skipped} skipped")
    return failures


if __name__ == "__main__":
    sys.exit(main())
