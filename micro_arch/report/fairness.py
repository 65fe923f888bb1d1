"""Fair comparison: which numbers can be compared across runs, and which run is best beyond the noise.

Pure functions on plain values, so that the rules can be tested without training anything.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

NOISE_SIGMAS = 2.0  # a difference counts once it exceeds this many standard errors of the difference


def standard_error(batch_losses: list[float]) -> float | None:
    """Standard error of the mean per-batch held-out loss; None with fewer than two batches, or when a batch
    loss is not finite (a diverged model: there is no noise to speak of)."""
    if len(batch_losses) < 2 or not all(math.isfinite(v) for v in batch_losses):
        return None
    return statistics.stdev(batch_losses) / math.sqrt(len(batch_losses))


@dataclass(frozen=True)
class Metric:
    key: str  # a column of the runs table; its standard error, if any, is in key + "_se"
    label: str
    lower_is_better: bool
    needs: str  # "tokenizer": same tokenizer and held-out data; "held_out": same held-out data; "hardware";
    # "timing": same hardware, and none of the runs measured on a busy machine


RANKED = [
    Metric("eval_loss", "held-out loss", True, "tokenizer"),
    Metric("perplexity", "perplexity", True, "tokenizer"),
    Metric("bits_per_byte", "bits per byte", True, "held_out"),
    Metric("top1", "top-1 accuracy", False, "tokenizer"),
    Metric("top5", "top-5 accuracy", False, "tokenizer"),
    Metric("tokens_per_sec", "throughput", False, "timing"),
    Metric("peak_memory_mb", "peak memory", True, "hardware"),
]


@dataclass
class Verdict:
    metric: str  # its label
    best: str | None  # the winner; None when within noise, not comparable, or fewer than two runs
    tied: list[str] = field(default_factory=list)  # runs within noise of each other at the top
    text: str = ""
    key: str = ""  # the column of the runs table, where known


def rank(metric: str, values: dict[str, float | None], errors: dict[str, float | None] | None = None,
         lower_is_better: bool = True, fmt=lambda v: f"{v:.4g}") -> Verdict:
    """The best run on one metric, or the runs whose difference from the best is within the noise.

    errors: standard errors by run; None for a metric measured without noise (exact comparison). A run
    is within noise of the best when |difference| < NOISE_SIGMAS * sqrt(se_best^2 + se_run^2).
    """
    present = {k: v for k, v in values.items() if v is not None and not math.isnan(v)}
    if len(present) < 2:
        return Verdict(metric, None, text=f"{metric}: fewer than two runs have it; nothing to rank")
    order = sorted(present, key=lambda k: present[k] if lower_is_better else -present[k])
    best = order[0]

    def shown(k):
        se = errors.get(k) if errors else None
        return f"{k} ({fmt(present[k])}" + (f" ± {fmt(se)}" if se is not None else "") + ")"

    def noise(k):  # None: unknown (a run without a standard error)
        if errors is None:
            return 0.0
        se_a, se_b = errors.get(best), errors.get(k)
        return None if se_a is None or se_b is None else NOISE_SIGMAS * math.hypot(se_a, se_b)

    def within(k):
        n = noise(k)
        return present[k] == present[best] or (n is not None and abs(present[k] - present[best]) < n)

    tied = [k for k in order[1:] if within(k)]
    if tied:
        runs = [best, *tied]
        if errors is None:
            return Verdict(metric, None, runs,
                           f"{metric}: equal for {', '.join(map(shown, runs))}; no winner")
        return Verdict(metric, None, runs, f"{metric}: within noise between {', '.join(map(shown, runs))} "
                                           f"(differences below {NOISE_SIGMAS:g} standard errors); no winner")
    runner_up = order[1]
    gap = abs(present[runner_up] - present[best])
    n = noise(runner_up)
    margin = ("" if errors is None else
              ", noise unknown (a run has a single evaluation batch)" if n is None else
              f", a difference of {fmt(gap)} against a noise of {fmt(n)}")
    return Verdict(metric, best, text=f"{metric}: best is {shown(best)}; next {shown(runner_up)}{margin}")


@dataclass
class Fairness:
    """What may be compared: one tokenizer? one held-out text? one kind of hardware?"""
    one_tokenizer: bool
    held_out_groups: list[list[str]]  # runs evaluated on the same held-out data, one list per dataset
    one_hardware: bool
    notes: list[str]
    busy: list[str] = field(default_factory=list)  # runs timed while the machine was busy with other work

    @property
    def same_held_out(self) -> bool:
        return len(self.held_out_groups) <= 1

    @property
    def headline(self) -> str:
        """The metric that decides "best overall": bits per byte once tokenizers differ."""
        return "eval_loss" if self.one_tokenizer else "bits_per_byte"

    def comparable(self, metric: Metric) -> str | None:
        """None when the metric can be compared across these runs; otherwise why not."""
        if metric.needs in ("tokenizer", "held_out") and not self.same_held_out:
            return "not comparable: the runs were evaluated on different held-out data"
        if metric.needs == "tokenizer" and not self.one_tokenizer:
            return "not comparable across tokenizers; compare bits per byte"
        if metric.needs in ("hardware", "timing") and not self.one_hardware:
            return "not comparable: measured on different hardware"
        if metric.needs == "timing" and self.busy:
            return f"not comparable: {', '.join(self.busy)} ran on a busy machine"
        return None


def _same_held_out(a: dict, b: dict) -> bool:
    if a.get("tokenizer") == b.get("tokenizer"):
        return a.get("data_fingerprint") == b.get("data_fingerprint")
    # data_fingerprint mixes in the tokenizer, so across tokenizers only the text's own key can tell
    return a.get("corpus_key") is not None and a.get("corpus_key") == b.get("corpus_key")


def assess(facts: dict[str, dict]) -> Fairness:
    """facts: by run, its tokenizer, data_fingerprint, corpus_key (the held-out text without the
    tokenizer, None if unknown), device and world_size."""
    notes = []
    tokenizers = sorted({str(f.get("tokenizer")) for f in facts.values()})
    if len(tokenizers) > 1:
        notes.append(f"The runs use different tokenizers ({', '.join(tokenizers)}): loss, perplexity and "
                     "accuracies are per token and not comparable across them; runs are ranked on bits per "
                     "byte.")
    groups: list[list[str]] = []
    for name, f in facts.items():
        group = next((g for g in groups if _same_held_out(facts[g[0]], f)), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    if len(groups) > 1:
        described = "; ".join(f"{', '.join(g)} (data_fingerprint {facts[g[0]].get('data_fingerprint')})"
                              for g in groups)
        notes.append(f"Different held-out data: {described}. Their held-out numbers are not comparable and "
                     "no run is ranked on them; compare runs trained on the same data.source and split.")
    hardware = sorted({f"{f.get('device')} x{f.get('world_size', 1)}" for f in facts.values()})
    if len(hardware) > 1:
        notes.append(f"Throughput and peak memory come from different hardware ({', '.join(hardware)}) and "
                     "are not ranked.")
    busy = [name for name, f in facts.items() if _busy(f)]
    if busy:
        loads = ", ".join(f"{name} {facts[name]['load_average']:g} on {facts[name]['cpu_count']} CPUs" for name in busy)
        notes.append(f"Throughput is not ranked: the machine was busy with other work while these runs trained "
                     f"(mean load average {loads}); time them again on a quiet machine.")
    return Fairness(len(tokenizers) <= 1, groups, len(hardware) <= 1, notes, busy)


def _busy(facts: dict) -> bool:
    """More runnable threads than CPUs, besides about one CPU's worth for the run itself (its own threads
    count in the load average too)."""
    load, cpus = facts.get("load_average"), facts.get("cpu_count")
    return load is not None and cpus is not None and load > cpus + 1


def verdicts(table, fairness: Fairness, fmt_of=None) -> list[Verdict]:
    """A verdict for every ranked metric of a runs table (a DataFrame indexed by run label)."""
    found = []
    for metric in RANKED:
        if metric.key not in table:
            continue
        why_not = fairness.comparable(metric)
        if why_not:
            found.append(Verdict(metric.label, None, text=f"{metric.label}: {why_not}", key=metric.key))
            continue
        se_key = metric.key + "_se"
        errors = table[se_key].map(_none_if_nan).to_dict() if se_key in table else None
        fmt = (fmt_of or {}).get(metric.key, lambda v: f"{v:.4g}")
        verdict = rank(metric.label, table[metric.key].map(_none_if_nan).to_dict(), errors,
                       metric.lower_is_better, fmt)
        verdict.key = metric.key
        found.append(verdict)
    return found


def _none_if_nan(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
