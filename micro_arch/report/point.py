"""Where runs are compared: at equal training FLOPs (the default), equal tokens, equal wall time, or the end.

At a point on the way (flops, tokens, time), each run's held-out curve (metrics.csv: the trainer's
evaluations on train.eval_batches batches) is interpolated, linearly in the log of the x axis, at the
largest x that every run reached. At the end, each run's full-split evaluation (eval.json) is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from micro_arch.errors import MicroArchError

AT = ("flops", "tokens", "time", "end")
UNIT = {"flops": "FLOPs", "tokens": "tokens", "time": "s"}
COLUMN_WORDS = {"flops": "FLOPs", "tokens": "tokens", "time": "wall time"}
COLUMN = {"flops": "flops", "tokens": "tokens", "time": "elapsed_s"}
WORDS = {"flops": "equal training FLOPs", "tokens": "equal tokens", "time": "equal wall time",
         "end": "the end of training"}


def value_at(xs, ys, x: float) -> float | None:
    """ys at x, interpolated linearly in log(x) between the two neighbouring points; None outside the curve."""
    pairs = sorted((float(a), float(b)) for a, b in zip(xs, ys)
                   if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and a > 0)
    if not pairs or x <= 0 or not pairs[0][0] * (1 - 1e-9) <= x <= pairs[-1][0] * (1 + 1e-9):
        return None
    for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y1
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return pairs[0][1] if len(pairs) == 1 else pairs[-1][1]


@dataclass
class Point:
    at: str  # one of AT
    x: float | None  # the common x (None at the end)
    values: dict  # by run label: the held-out value there (None where a run cannot give one)
    notes: list

    @property
    def words(self) -> str:
        if self.at == "end":
            return "at the end of training (each run's full held-out split)"
        shown = {"flops": f"{self.x:.3g} FLOPs", "tokens": f"{self.x:,.0f} tokens", "time": f"{self.x:,.1f} s"}
        return (f"at {WORDS[self.at]} ({shown[self.at]}, the most every run reached; held-out curves "
                f"interpolated in log {COLUMN_WORDS[self.at]})")


def comparison_point(at: str, curves: dict, end_values: dict, fairness=None) -> Point:
    """curves: by run label, a DataFrame with tokens, elapsed_s, flops and val_loss (None: no curve);
    end_values: by run label, its full-split value. `fairness` (report.fairness.Fairness) vets wall time."""
    if at not in AT:
        raise MicroArchError(f"--at {at}: compare at one of {', '.join(AT)}")
    if at == "end":
        return Point("end", None, dict(end_values), [])
    if at == "time" and fairness is not None:
        why = ("the runs were timed on different hardware" if not fairness.one_hardware else
               f"{', '.join(fairness.busy)} trained on a busy machine" if fairness.busy else None)
        if why:
            raise MicroArchError(f"--at time: {why}, so equal wall time is not equal work; compare at "
                                 "--at flops (the default) or --at tokens")
    column = COLUMN[at]
    reach, notes = {}, []
    for label, df in curves.items():
        rows = None if df is None else df.dropna(subset=[column, "val_loss"])
        if rows is None or rows.empty:
            notes.append(f"{label}: no held-out curve against {UNIT[at]} (metrics.csv), so it has no value "
                         f"{WORDS[at]}")
            continue
        reach[label] = rows
    if not reach:
        return Point(at, None, dict.fromkeys(curves), notes)
    x = min(float(rows[column].max()) for rows in reach.values())
    values = {label: None for label in curves}
    for label, rows in reach.items():
        values[label] = value_at(rows[column], rows["val_loss"], x)
        if values[label] is None:
            notes.append(f"{label}: its first held-out evaluation comes after {x:.3g} {UNIT[at]}, the most every run "
                         "reached; it has no value there (evaluate more often: train.eval_every)")
    early = [label for label, rows in reach.items() if values[label] is not None and float(rows[column].max()) > x * 1.01]
    if early:
        budget = {"flops": "train.budget_flops", "tokens": "train.budget_tokens"}.get(at, "one budget")
        notes.append(f"{', '.join(early)}: read before the end of training, where a decaying learning rate has not "
                     f"finished its schedule; for a like-for-like point train every arm to one {budget}")
    return Point(at, x, values, notes)
