"""The difference between two arms (seed groups) with a 95% interval, from their seed-level values.

Welch's t on the seed means; paired by seed when every seed of one arm has a partner in the other trained
on the same data order (train.data_seed, or the same seed when it orders the data too). With one seed in
an arm, training noise is unknown and no interval is given.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.95


def need_scipy(what: str):
    """scipy.stats, or one line saying how to install it."""
    try:
        from scipy import stats
    except ImportError:
        from micro_arch.errors import MicroArchError

        raise MicroArchError(f"{what} needs scipy: pip install 'micro-arch[stats]' (or pip install scipy)") from None
    return stats


@dataclass
class Arm:
    label: str
    values: dict[int, float]  # by seed
    data_orders: dict[int, int] | None = None  # by seed: the seed of its data order (None: unknown)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def spread(self) -> float | None:
        """The seed-to-seed standard deviation; None with one seed."""
        return statistics.stdev(self.values.values()) if self.n > 1 else None


@dataclass
class Difference:
    """b − a with its 95% interval (diff ± half_width)."""
    a: Arm
    b: Arm
    diff: float
    half_width: float | None  # None: one seed in an arm, training noise unknown
    method: str  # "Welch's t", "paired t over seeds", or "one seed per arm"
    df: float | None = None
    resolving_seeds: int | None = None  # seeds per arm that would resolve a difference of this size

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.diff - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.diff + self.half_width

    @property
    def resolved(self) -> bool:
        return self.half_width is not None and (self.low > 0 or self.high < 0)

    @property
    def better(self) -> str | None:
        """The arm with the lower value, once resolved."""
        if not self.resolved:
            return None
        return self.a.label if self.diff > 0 else self.b.label


def paired_seeds(a: Arm, b: Arm) -> list[int] | None:
    """The seeds to pair on, when both arms have the same seeds, each pair on one data order."""
    if a.n < 2 or set(a.values) != set(b.values) or a.data_orders is None or b.data_orders is None:
        return None
    if any(a.data_orders.get(s) is None or a.data_orders.get(s) != b.data_orders.get(s) for s in a.values):
        return None
    return sorted(a.values)


def difference(a: Arm, b: Arm, level: float = LEVEL) -> Difference:
    diff = b.mean - a.mean
    if a.n < 2 or b.n < 2:
        return Difference(a, b, diff, None, "one seed per arm" if a.n == b.n == 1 else "one seed in an arm")
    stats = need_scipy("a verdict across seeds")
    q = 1 - (1 - level) / 2
    seeds = paired_seeds(a, b)
    if seeds is not None:
        deltas = [b.values[s] - a.values[s] for s in seeds]
        sd, n = statistics.stdev(deltas), len(deltas)
        df = n - 1
        half = stats.t.ppf(q, df) * sd / math.sqrt(n)
        resolving = _seeds_to_resolve(diff, lambda k: sd / math.sqrt(k), lambda k: k - 1, stats, q)
        return Difference(a, b, diff, half, "paired t over seeds", df, resolving)
    va, vb = a.spread ** 2 / a.n, b.spread ** 2 / b.n
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1)) if se > 0 else a.n + b.n - 2
    half = stats.t.ppf(q, df) * se
    sa, sb = a.spread, b.spread
    resolving = _seeds_to_resolve(diff, lambda k: math.sqrt((sa ** 2 + sb ** 2) / k),
                                  lambda k: _welch_df(sa, sb, k), stats, q)
    return Difference(a, b, diff, half, "Welch's t", df, resolving)


def _welch_df(sa: float, sb: float, k: int) -> float:
    va, vb = sa ** 2 / k, sb ** 2 / k
    return (va + vb) ** 2 / ((va ** 2 + vb ** 2) / (k - 1)) if va + vb > 0 else 2 * k - 2


def _seeds_to_resolve(diff, se_of, df_of, stats, q, most: int = 10_000) -> int | None:
    """The fewest seeds per arm whose 95% interval would exclude zero, were the difference and the spread to
    stay what they are now (None: more than `most`, or no difference at all)."""
    if diff == 0:
        return None
    for k in range(2, most + 1):
        if stats.t.ppf(q, df_of(k)) * se_of(k) < abs(diff):
            return k
    return None


MEASURE = "train each arm as a seed group (`micro-arch run EXP --seeds 3`) and compare the groups"


def describe(d: Difference, fmt=lambda v: f"{v:+.4f}", unit: str = "nats", where: str = "",
             measure: str = MEASURE) -> str:
    """One line: the verdict, the difference with its interval, the seeds, and what would settle it."""
    seeds = (("one seed each" if d.a.n == 1 else f"{d.a.n} seeds each") if d.a.n == d.b.n else
             f"{d.a.n} and {d.b.n} seeds")
    at = f" {where}" if where else ""
    core = f"{d.b.label} − {d.a.label} = {fmt(d.diff)}"
    if d.half_width is None:
        return (f"no winner: {core} {unit}{at}, {seeds}; training noise is unknown with one seed in an arm "
                "(initialisation and data order alone often move the loss by as much), so this difference may "
                f"be noise; measure it: {measure}")
    interval = f"{core} ± {fmt(d.half_width).lstrip('+')} {unit} (95% interval, {d.method}, {seeds}){at}"
    if d.resolved:
        return f"{d.better} is better: {interval}"
    more = (f"about {d.resolving_seeds} seeds per arm would resolve a difference of this size"
            if d.resolving_seeds else "a difference this small would need more than 10,000 seeds per arm to resolve")
    return f"unresolved: {interval}; the interval includes zero; {more}"
