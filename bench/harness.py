"""Time per 1,000 multiple-choice requests through the lm-eval adapter (micro_arch.eval.harness), batched and
unbatched, for the default experiment's model on this machine.

The requests are the shipped local task's (tasks/shakespeare-mc: a context and four one-line choices per
question, each choice one log-likelihood request), repeated until there are --requests of them; they go
through MicroArchLM.loglikelihood as lm-eval sends them (tokenising, left truncation to the 64-character
context, batches of requests sorted by length). The weights are the default experiment's shapes, randomly
initialised unless --run names a trained run of it (time does not depend on the values). The two settings
take turns for --rounds rounds so that machine noise hits both alike; printed are the median seconds per
1,000 requests of each and the speed-up of batching as the median of each round's ratio.

    python bench/harness.py [--batch-size 32] [--requests 1000] [--rounds 3] [--run runs/shakespeare-char/<id>]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "tasks" / "shakespeare-mc" / "shakespeare_mc.jsonl"


class Request:
    def __init__(self, *args):
        self.args = args


def requests_of_task(n: int) -> list[Request]:
    rows = [json.loads(line) for line in TASK.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [(row["context"], choice) for row in rows for choice in row["choices"]]
    return [Request(*pairs[i % len(pairs)]) for i in range(n)]


def default_model(run: str | None):
    """(cfg, model, tokenizer): a trained run's, or the default experiment's shapes with fresh weights."""
    if run:
        from micro_arch.rundir import load_run

        return load_run(run)
    from micro_arch.data import prepare_data
    from micro_arch.experiment import load_experiment
    from micro_arch.model.model import Model

    cfg = load_experiment(str(ROOT / "experiments" / "shakespeare-char"), [])
    tokenizer = prepare_data(cfg.data).tokenizer
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    return cfg, Model(cfg.model).eval(), tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run", default=None, help="a trained run of experiments/shakespeare-char (optional)")
    args = parser.parse_args(argv)

    from micro_arch.eval.harness import MicroArchLM

    cfg, model, tokenizer = default_model(args.run)
    requests = requests_of_task(args.requests)
    settings = {"unbatched (1)": 1, f"batched ({args.batch_size})": args.batch_size}
    times: dict[str, list[float]] = {name: [] for name in settings}
    results = {}
    for _ in range(args.rounds):
        for name, size in settings.items():
            lm = MicroArchLM.for_model(cfg, model, tokenizer, batch_size=size)
            start = time.perf_counter()
            results[name] = lm.loglikelihood(requests, disable_tqdm=True)
            times[name].append((time.perf_counter() - start) * 1000 / len(requests))
    (a, b) = settings
    worst = max(abs(x[0] - y[0]) for x, y in zip(results[a], results[b]))
    print(f"{len(requests)} requests of tasks/shakespeare-mc, model of experiments/shakespeare-char "
          f"({sum(p.numel() for p in model.parameters()):,} parameters), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    for name in settings:
        print(f"  {name:>14}: {statistics.median(times[name]):.2f} s per 1,000 requests "
              f"(rounds: {', '.join(f'{t:.2f}' for t in times[name])})")
    ratios = [x / y for x, y in zip(times[a], times[b])]
    print(f"  batching is {statistics.median(ratios):.2f}x faster (median of rounds; range "
          f"{min(ratios):.2f}-{max(ratios):.2f}); largest |difference| in a log-likelihood: {worst:.2e}")


if __name__ == "__main__":
    main()
