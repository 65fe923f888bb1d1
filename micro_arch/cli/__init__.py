"""The `micro-arch` command line: run, prepare, trace, blocks, sweep, compare, generate, eval."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from micro_arch.cli.argtypes import (
    budget_list,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
    probability,
    seeds_value,
)
from micro_arch.errors import MicroArchError

console = Console()


def cmd_blocks(args) -> None:
    from micro_arch.commands.blocks import blocks_command

    blocks_command(args.pattern, args.kind, args.experiment)


def cmd_trace(args) -> None:
    from micro_arch.commands.trace import trace_command

    trace_command(args.experiment, args.set, depth=args.depth, batch=args.batch, seq_len=args.seq_len, out=args.out)


def cmd_prepare(args) -> None:
    from micro_arch.commands.prepare import prepare_command

    prepare_command(args.experiment, args.set)


def cmd_run(args) -> None:
    from micro_arch.commands.run import run_experiment
    from micro_arch.commands.seeds import group_folder, run_group
    from micro_arch.train.stop import RunInterrupted

    try:
        if (args.seeds is not None or group_folder(args.resume) is not None) and not args.dry_run:
            run_group(args.experiment, seeds=args.seeds, overrides=args.set, resume=args.resume,
                      runs_root=args.runs_dir, nproc=args.nproc, checkpoint=args.checkpoint)
            return
        run_experiment(args.experiment, overrides=args.set, resume=args.resume, dry_run=args.dry_run,
                       runs_root=args.runs_dir, nproc=args.nproc, checkpoint=args.checkpoint, into=args.into)
    except RunInterrupted as stop:  # saved and explained already; 130 for Ctrl-C, 143 for SIGTERM
        sys.exit(stop.exit_code)


def cmd_generate(args) -> None:
    from micro_arch.commands.generate import generate_command

    generate_command(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, checkpoint=args.checkpoint,
                     device=args.device, num_samples=args.num_samples)


def cmd_chat(args) -> None:
    from micro_arch.commands.chat import chat_command

    chat_command(args.run_dir, args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                 checkpoint=args.checkpoint, device=args.device)


def cmd_eval(args) -> None:
    from micro_arch.commands.evaluate import eval_command

    eval_command(args.run_dir, data=args.data, checkpoint=args.checkpoint, batch_size=args.batch_size,
                 max_batches=args.max_batches, device=args.device, text_field=args.text_field, tasks=args.tasks,
                 num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                 apply_chat_template=args.apply_chat_template)


def cmd_sweep(args) -> None:
    from micro_arch.sweep.study import run_sweep

    rendezvous = None
    if args.nnodes is not None or args.rdzv_endpoint is not None:
        if args.nnodes is None or args.rdzv_endpoint is None:
            raise MicroArchError("sweep: --nnodes and --rdzv-endpoint go together (torchrun's rendezvous for the "
                                 "full trainings over several machines), e.g. --nnodes 2 --rdzv-endpoint node1:29500")
        rendezvous = [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                      f"--rdzv-id={args.rdzv_id or 'micro-arch-sweep'}"]
    run_sweep(args.sweep, overrides=args.set, n_trials=args.trials, workers=args.workers, storage=args.storage,
              full_training=not args.no_full_training, rendezvous=rendezvous, runs_root=args.runs_dir)


def cmd_ladder(args) -> None:
    from micro_arch.ladder.command import ladder_command

    ladder_command(args.ladder, overrides=args.set, budgets=args.budgets, seeds=args.seeds, runs_root=args.runs_dir,
                   report_only=args.report_only)


def cmd_compare(args) -> None:
    if args.data:
        from micro_arch.eval.text import compare_on_data

        compare_on_data(args.runs, args.data, args.out, console=console, text_field=args.text_field)
        return
    from micro_arch.report.compare import compare

    compare(args.runs, args.out, prompts=args.prompt or None, console=console, at=args.at)


def cmd_export(args) -> None:
    from micro_arch.commands.export import export_command

    export_command(args.run_dir, args.out, checkpoint=args.checkpoint, dtype=args.dtype,
                   max_shard_size=args.max_shard_size)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other micro-arch error (exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def with_sampling(p, top_k: int):
    """The sampling arguments generate and chat share, checked while parsing."""
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="longest text, in tokens")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=top_k)
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: the run's latest)")
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="micro-arch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_set(p):
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config values, e.g. --set train.max_steps=200 model.d_model=64")
        return p

    p = with_set(sub.add_parser("run", help="train an experiment; resumable"))
    p.add_argument("experiment", help="experiment folder, e.g. experiments/shakespeare-char")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest intact checkpoint")
    p.add_argument("--checkpoint", metavar="FILE", default=None,
                   help="with --resume: resume from this checkpoint (a name in RUN_DIR/checkpoints such as "
                        "step_0001000.pt, or a path) instead of the latest")
    p.add_argument("--dry-run", action="store_true", help="print sizes, FLOPs and memory, then exit")
    p.add_argument("--runs-dir", default="runs", type=output_dir,
                   help="where run directories go (default: runs)")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes to train with (DDP through torchrun)")
    p.add_argument("--seeds", default=None, metavar="N|S1,S2,...",
                   help="a seed group: N seeds from train.seed on, or these seeds, each in its own run folder "
                        "under one group folder; --resume GROUP (or any member) trains what is unfinished")
    p.add_argument("--into", default=None, help=argparse.SUPPRESS)  # a seed group's member folder (its workers)
    p.set_defaults(func=cmd_run)

    p = with_set(sub.add_parser("prepare", help="show the data plan, then prepare the token shards (run does it too)"))
    p.add_argument("experiment", help="experiment folder, e.g. experiments/shakespeare-char")
    p.set_defaults(func=cmd_prepare)

    p = with_set(sub.add_parser("trace", help="show how shapes flow through every module"))
    p.add_argument("experiment")
    p.add_argument("--depth", type=non_negative_int, default=None,
                   help="how many levels of modules to show (0: only the model's own line)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size of the traced input (default: train.batch_size)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="length of the traced input (default: train.seq_len)")
    p.add_argument("--out", type=output_file, default=None,
                   help="also write the tree as plain text to this file (its folder must exist)")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("blocks", help="list the registered blocks")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard on names, e.g. 'rms*'")
    p.add_argument("--kind", default=None, help="norm, attention, mlp, moe, ssm or other")
    p.add_argument("--experiment", default=None, metavar="DIR",
                   help="also the blocks of this experiment (its blocks.py and its extends parents') or run folder")
    p.set_defaults(func=cmd_blocks)

    p = with_set(sub.add_parser("sweep", help="run an Optuna study, then train the best configs in full"))
    p.add_argument("sweep", help="sweep file, e.g. sweeps/tiny.yaml")
    p.add_argument("--trials", type=positive_int, default=None, help="override the number of trials")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes on this machine, each on its own device (default: one per visible GPU, "
                        "1 on a CPU)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="where the study lives, shared by every worker of every machine that names it: "
                        "journal:PATH, sqlite:///PATH, postgresql://USER@HOST/DB, mysql://USER@HOST/DB "
                        "(default: runs/sweeps/<name>/study.db)")
    p.add_argument("--runs-dir", default="runs", type=output_dir,
                   help="root of the sweep's folder (runs/sweeps/<name>/) and of its trials' runs")
    p.add_argument("--no-full-training", action="store_true",
                   help="run trials only (e.g. on the other machines of a multi-machine sweep)")
    p.add_argument("--nnodes", type=positive_int, default=None,
                   help="full trainings with DDP over this many machines (torchrun's --nnodes)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="torchrun's rendezvous endpoint")
    p.add_argument("--rdzv-id", default=None, help="torchrun's rendezvous id (default: micro-arch-sweep)")
    p.set_defaults(func=cmd_sweep)

    p = with_set(sub.add_parser("ladder", help="train a scaling ladder; fit loss against compute with intervals"))
    p.add_argument("ladder", help="ladder file, e.g. ladders/attention-heads.yaml")
    p.add_argument("--budgets", type=budget_list, default=None, metavar="C1,C2,...",
                   help="replace the file's compute budgets (training FLOPs), e.g. for a quick trial")
    p.add_argument("--seeds", default=None, metavar="N|S1,S2,...", type=seeds_value,
                   help="replace the file's seeds per point: a number or a list")
    p.add_argument("--runs-dir", default="runs", type=output_dir, help="the ladder goes in RUNS_DIR/ladders/<name>")
    p.add_argument("--report-only", action="store_true", help="train nothing; fit and report the completed points")
    p.set_defaults(func=cmd_ladder)

    p = sub.add_parser("compare", help="write a report that compares runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or seed-group folders (their members)")
    p.add_argument("--out", type=output_dir, default=None,
                   help="report folder, created if missing; its parent must exist (default: runs/compare/<time>)")
    p.add_argument("--prompt", action="append", help="generate fresh samples for this prompt (repeatable)")
    p.add_argument("--at", choices=["flops", "tokens", "time", "end"], default="flops",
                   help="where held-out loss is compared: equal training FLOPs (default), equal tokens, equal wall "
                        "time (same hardware, not busy) or the end of training (full split)")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="instead: rank the runs in bits per byte on this text (a file, glob or 'shakespeare')")
    p.add_argument("--text-field", default="text", help="with --data: the column that holds the text (.jsonl/.parquet)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="sample from a trained run with a KV cache")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    with_sampling(p, top_k=200)
    p.add_argument("--num-samples", type=positive_int, default=1)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat with an SFT or DPO run (Ctrl-D to leave)")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", default=None,
                   help="a user turn to answer without a terminal (repeatable: a multi-turn script)")
    p.add_argument("--system", default=None, help="a system turn, e.g. 'ROMEO answers JULIET.'")
    with_sampling(p, top_k=50)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="held-out loss, perplexity, bits per byte, top-k accuracy; "
                                    "lm-evaluation-harness tasks with --tasks")
    p.add_argument("run_dir", nargs="+", help="a run (several with --tasks: one table)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-batches", type=positive_int, default=None, help="evaluate on at most this many batches")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="evaluate on this text instead of the held-out split: a .txt/.jsonl/.parquet file, a glob, "
                        "a folder or 'shakespeare'; characters the tokenizer cannot encode are counted")
    p.add_argument("--text-field", default="text", help="with --data: the column that holds the text (.jsonl/.parquet)")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="instead: lm-evaluation-harness tasks (needs pip install -e '.[eval]'); scores and their "
                        "CORE-style centered mean go to each run's downstream.json")
    p.add_argument("--num-fewshot", type=non_negative_int, default=None, help="with --tasks: examples in each prompt")
    p.add_argument("--limit", type=positive_int, default=None, help="with --tasks: at most this many documents per task")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="with --tasks: also the task YAMLs in this folder (e.g. tasks/shakespeare-mc)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="with --tasks: an SFT/DPO run's requests in its chat template")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers folder (logits checked)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, type=output_dir,
                   help="the folder to create (must not exist or be empty); its parent must exist")
    p.add_argument("--checkpoint", default=None, help="e.g. step_0001000.pt (default: the run's latest)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-size", default="2GB", help="safetensors files are split above this size")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MicroArchError as err:
        from micro_arch.config import blame_override

        if getattr(err, "main_only", False) and os.environ.get("RANK", "0") != "0":
            sys.exit(2)  # the same error on every rank of a DDP run: rank 0 says it
        print(f"error: {blame_override(err, getattr(args, 'set', None))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
