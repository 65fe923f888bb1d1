"""Verdicts across seeds (report/seed_stats.py, report/groups.py) and the point they are made at (report/point.py)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from scipy import stats

from micro_arch.commands.seeds import run_group
from micro_arch.errors import MicroArchError
from micro_arch.report.compare import compare
from micro_arch.report.fairness import Fairness
from micro_arch.report.groups import arms, group_runs
from micro_arch.report.point import comparison_point, value_at
from micro_arch.report.seed_stats import Arm, describe, difference

# the numbers: llama (GQA) and its MQA variant, three seeds each, held-out loss at 2000 steps
LLAMA = {1: 1.6815, 2: 1.6947, 3: 1.6968}
MQA = {1: 1.6974, 2: 1.7014, 3: 1.6902}


def test_welch_interval_matches_scipy():
    a, b = Arm("llama", LLAMA), Arm("mqa", MQA)
    d = difference(a, b)
    ref = stats.ttest_ind(list(MQA.values()), list(LLAMA.values()), equal_var=False)
    low, high = ref.confidence_interval(0.95)
    assert d.method == "Welch's t" and d.df == pytest.approx(ref.df)
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    assert d.diff == pytest.approx(0.0053333, abs=1e-6)  # the issue: MQA worse by 0.005 nats
    assert not d.resolved and d.better is None
    text = describe(d)
    assert text.startswith("unresolved: mqa − llama = +0.0053 ± ") and "3 seeds each" in text
    assert f"about {d.resolving_seeds} seeds per arm would resolve" in text


def test_welch_interval_by_hand():
    # a = 1, 2, 3 and b = 2, 3, 4: difference 1, each sd 1, se sqrt(2/3), Welch df 4, t(0.975, 4) = 2.776445
    d = difference(Arm("a", {1: 1.0, 2: 2.0, 3: 3.0}), Arm("b", {4: 2.0, 5: 3.0, 6: 4.0}))
    assert d.diff == pytest.approx(1.0) and d.df == pytest.approx(4.0)
    assert d.half_width == pytest.approx(2.776445 * math.sqrt(2 / 3), rel=1e-6)


def test_paired_by_seed_when_the_data_order_is_shared():
    orders = {1: 7, 2: 8, 3: 9}
    a, b = Arm("llama", LLAMA, orders), Arm("mqa", MQA, orders)
    d = difference(a, b)
    ref = stats.ttest_rel(list(MQA.values()), list(LLAMA.values()))
    assert d.method == "paired t over seeds" and d.df == 2
    assert (d.low, d.high) == tuple(pytest.approx(v) for v in ref.confidence_interval(0.95))
    # other data orders for one pair: no pairing, Welch
    assert difference(a, Arm("mqa", MQA, {1: 7, 2: 8, 3: 10})).method == "Welch's t"


def test_a_resolved_difference_names_the_lower_arm():
    d = difference(Arm("a", {1: 1.50, 2: 1.51, 3: 1.52}), Arm("b", {1: 1.60, 2: 1.61, 3: 1.63}))
    assert d.resolved and d.better == "a" and d.low > 0
    assert describe(d).startswith("a is better: b − a = +0.1033 ± ")


def test_resolving_seeds_would_resolve_and_one_fewer_would_not():
    d = difference(Arm("llama", LLAMA), Arm("mqa", MQA))
    k = d.resolving_seeds
    sa, sb = Arm("x", LLAMA).spread, Arm("x", MQA).spread

    def half(n):
        va, vb = sa ** 2 / n, sb ** 2 / n
        df = (va + vb) ** 2 / ((va ** 2 + vb ** 2) / (n - 1))
        return stats.t.ppf(0.975, df) * math.sqrt(va + vb)

    assert k > 3 and half(k) < abs(d.diff) <= half(k - 1)


def test_one_seed_per_arm_never_names_a_winner():
    for a, b in (({1: 1.0}, {1: 2.0}), ({1: 1.0}, {1: 1.0001}), ({1: 1.0, 2: 1.01}, {1: 3.0})):
        d = difference(Arm("a", a), Arm("b", b))
        text = describe(d)
        assert d.half_width is None and not d.resolved and d.better is None
        assert text.startswith("no winner: ") and "training noise is unknown" in text and "--seeds" in text
        assert "better" not in text


def fake_run(label, experiment, group, seed, data_seed=None):
    return SimpleNamespace(label=label, path=Path(label), settings={"train.seed": seed},
                           summary={"experiment": experiment, "group": group, "seed": seed, "data_seed": data_seed})


def test_runs_are_grouped_by_configuration_without_the_seed():
    runs = [fake_run("r1", "llama", "g1", 1), fake_run("r2", "mqa", "g2", 1), fake_run("r3", "llama", "g1", 2),
            fake_run("r4", "llama", "g3", 1)]
    runs[3].settings["model.d_model"] = 64
    groups = group_runs(runs)
    # one experiment as two arms: told apart by the setting they differ in
    assert list(groups) == ["llama (model.d_model=None)", "mqa", "llama (model.d_model=64)"]
    assert [r.label for r in groups["llama (model.d_model=None)"]] == ["r1", "r3"]
    found = arms(groups, {"r1": 1.0, "r2": 2.0, "r3": 1.5, "r4": None})
    assert [(a.label, a.values) for a in found] == [("llama (model.d_model=None)", {1: 1.0, 2: 1.5}),
                                                    ("mqa", {1: 2.0})]
    assert found[0].data_orders == {1: 1, 2: 2}  # no data_seed: the seed orders the data


def test_runs_without_a_recorded_group_are_grouped_by_their_settings():
    runs = [SimpleNamespace(label=f"r{i}", path=Path(f"r{i}"), summary={"experiment": "x"},
                            settings={"train.seed": seed, "model.d_model": d, "train.eval_every": ev})
            for i, (seed, d, ev) in enumerate([(1, 64, 10), (2, 64, 20), (1, 32, 10)])]
    assert [[r.label for r in g] for g in group_runs(runs).values()] == [["r0", "r1"], ["r2"]]


# --- the comparison point --------------------------------------------------------------------------


def test_value_at_interpolates_in_log_x():
    xs, ys = [1e9, 1e10, 1e11], [3.0, 2.0, 1.5]
    assert value_at(xs, ys, 10 ** 9.5) == pytest.approx(2.5)
    assert value_at(xs, ys, 3e9) == pytest.approx(3.0 - math.log10(3))  # by hand: 1 - log10(3) of the way
    assert value_at(xs, ys, 1e10) == pytest.approx(2.0)
    assert value_at(xs, ys, 2e10) == pytest.approx(2.0 - 0.5 * math.log10(2))
    assert value_at(xs, ys, 5e8) is None and value_at(xs, ys, 2e11) is None


def test_equal_flops_is_the_most_every_run_reached():
    def curve(flops, loss):
        return pd.DataFrame({"flops": flops, "tokens": [f / 10 for f in flops], "elapsed_s": [1.0] * len(flops),
                             "val_loss": loss})

    curves = {"a": curve([1e9, 1e10, 1e11], [3.0, 2.0, 1.5]), "b": curve([2e9, 2e10], [2.8, 1.9]), "c": None}
    point = comparison_point("flops", curves, {"a": 1.4, "b": 1.8, "c": 1.7})
    assert point.x == 2e10 and point.values["b"] == pytest.approx(1.9)
    assert point.values["a"] == pytest.approx(2.0 - 0.5 * math.log10(2)) and point.values["c"] is None
    assert "c: no held-out curve" in point.notes[0] and "2e+10 FLOPs" in point.words
    assert point.notes[1].startswith("a: read before the end of training") and "train.budget_flops" in point.notes[1]
    assert comparison_point("end", curves, {"a": 1.4, "b": 1.8}).values == {"a": 1.4, "b": 1.8}
    assert comparison_point("tokens", curves, {}).x == 2e9
    busy = Fairness(True, [["a", "b"]], True, [], busy=["b"])
    with pytest.raises(MicroArchError, match="--at time: b trained on a busy machine"):
        comparison_point("time", curves, {}, busy)
    with pytest.raises(MicroArchError, match="different hardware"):
        comparison_point("time", curves, {}, Fairness(True, [["a", "b"]], False, []))


# --- compare on two seed groups, end to end ---------------------------------------------------------


def test_compare_two_seed_groups_prints_the_difference_with_its_interval(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    common = ["train.budget_flops=5e8", "train.eval_every=4", "train.log_every=4", "train.checkpoint_every=8",
              "train.sample.max_new_tokens=2"]
    wide = run_group(exp, seeds="1,2", overrides=common, runs_root=tmp_path / "runs")
    narrow = run_group(exp, seeds="1,2", overrides=[*common, "model.d_model=16"], runs_root=tmp_path / "runs")
    out = tmp_path / "report"
    compare([wide, narrow], out, device="cpu", max_batches=2)
    md = (out / "report.md").read_text()
    overall = next(line for line in md.splitlines() if line.startswith("- Overall"))
    assert "at equal training FLOPs (" in overall and "2 seeds each" in overall and "paired t over seeds" in overall
    table = md.split("## Seed groups")[1].split("##")[0]
    assert "| tiny (model.d_model=32) |" in table and "| tiny (model.d_model=16) |" in table and "1: " in table and "2: " in table
    # the numbers: each member's held-out curve at the FLOPs both arms reached (the narrow model's end)
    values = {}
    for group in (wide, narrow):
        for seed in (1, 2):
            run = group / f"seed-{seed}"
            flops = json.loads((run / "summary.json").read_text())["flops_per_token"]
            rows = pd.read_csv(run / "metrics.csv").dropna(subset=["val_loss"])
            values[group, seed] = (rows["tokens"] * flops, rows["val_loss"])
    x = min(v[0].max() for v in values.values())
    at = {k: value_at(fl, loss, x) for k, (fl, loss) in values.items()}
    deltas = [at[narrow, s] - at[wide, s] for s in (1, 2)]
    low, high = stats.ttest_rel([at[narrow, s] for s in (1, 2)], [at[wide, s] for s in (1, 2)]).confidence_interval()
    diff, half = sum(deltas) / 2, (high - low) / 2
    assert f"= {diff:+.4f} ± {half:.4f} nats (95% interval" in overall
    assert "best" not in overall


def test_the_command_line_takes_seeds_at_and_ladder_options(capsys):
    from micro_arch.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "exp", "--seeds", "1,5,9"]).seeds == "1,5,9"
    assert parser.parse_args(["compare", "a", "b"]).at == "flops"
    assert parser.parse_args(["compare", "a", "b", "--at", "end"]).at == "end"
    args = parser.parse_args(["ladder", "l.yaml", "--budgets", "1e9,3e9,1e10", "--seeds", "2"])
    assert args.budgets == [1e9, 3e9, 1e10] and args.seeds == 2 and not args.report_only
    assert parser.parse_args(["ladder", "l.yaml", "--seeds", "4,7"]).seeds == [4, 7]
    for bad in (["compare", "a", "--at", "noon"], ["ladder", "l.yaml", "--budgets", "1e9,-3"],
                ["ladder", "l.yaml", "--seeds", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "--budgets" in capsys.readouterr().err
