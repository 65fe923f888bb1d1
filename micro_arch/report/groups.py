"""Runs that differ only in seed form one arm of a comparison: its mean, its seed spread, each seed's value.

A run's arm is summary.json's `group` (rundir.group_id: the resolved configuration without the seed);
runs from before groups were recorded are grouped by their config.yaml without train.seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from micro_arch.report.seed_stats import Arm, describe, difference
from micro_arch.rundir import NOT_THE_CONFIGURATION


def expand_groups(paths) -> list[Path]:
    """Run folders, with a seed group's folder (group.json) replaced by its members."""
    from micro_arch.rundir import GROUP_FILE, member_dir

    found = []
    for given in paths:
        path = Path(given)
        if (path / GROUP_FILE).is_file() and not (path / "config.yaml").is_file():
            seeds = json.loads((path / GROUP_FILE).read_text()).get("seeds", [])
            found += [member_dir(path, s) for s in seeds]
        else:
            found.append(path)
    return found


def group_key(run) -> str:
    if run.summary.get("group"):
        return str(run.summary["group"])
    ignored = {f"train.{k}" for k in NOT_THE_CONFIGURATION} | {"description"}
    return repr(sorted((k, repr(v)) for k, v in run.settings.items() if k not in ignored and
                       not k.startswith("train.sample.")))


def group_runs(runs) -> dict[str, list]:
    """By arm label, its runs, in the order the arms first appear; labels are experiment names, with the
    group id added where one experiment appears as two arms."""
    keyed: dict[str, list] = {}
    for run in runs:
        keyed.setdefault(group_key(run), []).append(run)
    names = [members[0].summary.get("experiment") or members[0].path.name for members in keyed.values()]
    out = {}
    for (key, members), name in zip(keyed.items(), names):
        twins = [m[0] for m, n in zip(keyed.values(), names) if n == name]
        label = name if len(twins) == 1 else f"{name} ({_what_differs(members[0], twins) or key[-6:]})"
        while label in out:
            label += "'"
        out[label] = members
    return out


def _what_differs(run, others, most: int = 3) -> str:
    """run's values of the settings (seed aside) on which the arms of one experiment differ."""
    ignored = {f"train.{k}" for k in NOT_THE_CONFIGURATION}
    keys = sorted({k for r in others for k in r.settings} - ignored)
    differ = [k for k in keys if not k.startswith("train.sample.")
              and len({repr(r.settings.get(k)) for r in others}) > 1]
    return ", ".join(f"{k}={run.settings.get(k)}" for k in differ[:most]) + (", ..." if len(differ) > most else "")


def seed_of(run) -> int:
    seed = run.summary.get("seed")
    return int(seed if seed is not None else run.settings.get("train.seed", 0))


def data_order_of(run) -> int | None:
    s = run.settings
    if "train.seed" not in s and run.summary.get("seed") is None:
        return None
    data_seed = run.summary.get("data_seed", s.get("train.data_seed"))
    return int(data_seed) if data_seed is not None else seed_of(run)


def arms(groups: dict[str, list], values: dict) -> list[Arm]:
    """An Arm per group from the runs' values (by run label); runs without a value are left out, and two runs
    with one seed in one arm keep the first."""
    found = []
    for label, members in groups.items():
        by_seed, orders = {}, {}
        for run in members:
            v = values.get(run.label)
            if v is None or seed_of(run) in by_seed:
                continue
            by_seed[seed_of(run)] = float(v)
            orders[seed_of(run)] = data_order_of(run)
        if by_seed:
            found.append(Arm(label, by_seed, None if None in orders.values() else orders))
    return found


def arm_verdicts(found: list[Arm], where: str, unit: str) -> list[str]:
    """Each arm against the first (the baseline: the first run or group named on the command line)."""
    if len(found) < 2:
        return []
    base = found[0]
    return [describe(difference(base, arm), unit=unit, where=where) for arm in found[1:]]


def arms_table(found: list[Arm], fmt=lambda v: f"{v:.4f}"):
    """One row per arm: seeds, the value of each seed, mean and seed spread (sd)."""
    import pandas as pd

    rows = []
    for arm in found:
        rows.append({"arm": arm.label, "seeds": len(arm.values),
                     "each seed": ", ".join(f"{s}: {fmt(v)}" for s, v in sorted(arm.values.items())),
                     "mean": fmt(arm.mean),
                     "seed spread (sd)": "unknown (one seed)" if arm.spread is None else fmt(arm.spread)})
    return pd.DataFrame(rows, columns=["arm", "seeds", "each seed", "mean", "seed spread (sd)"])
