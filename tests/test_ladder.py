"""Scaling ladders: the fit of L(C) = E + A·C^(−α), its intervals, the ladder file, resumable training, the report."""

import json
import textwrap

import numpy as np
import pytest
from helpers import make_experiment
from scipy.optimize import curve_fit

from micro_arch.errors import MicroArchError
from micro_arch.ladder.fit import PowerLaw, crossings, fit_power_law, fit_with_bootstrap
from micro_arch.ladder.spec import load_ladder

TRUE = PowerLaw(E=1.6, A=300.0, alpha=0.25)


def synthetic(budgets=5, seeds=3, noise=0.01, span=100.0, rng=None):
    C = np.repeat(np.geomspace(1e12, 1e12 * span, budgets), seeds)
    L = TRUE(C) + (rng.normal(0, noise, len(C)) if noise else 0)
    return C, L


def test_the_fit_recovers_a_known_law():
    law = fit_power_law(*synthetic(noise=0))
    assert (law.E, law.A, law.alpha) == (pytest.approx(1.6, rel=1e-4), pytest.approx(300, rel=1e-3),
                                         pytest.approx(0.25, rel=1e-4))


def test_the_fit_agrees_with_scipy_curve_fit_on_noisy_points():
    C, L = synthetic(noise=0.02, rng=np.random.default_rng(3))
    law = fit_power_law(C, L)
    ref, _ = curve_fit(lambda c, E, A, a: E + A * c ** -a, C, L, p0=[1.5, 100, 0.2], maxfev=50_000)
    assert (law.E, law.A, law.alpha) == tuple(pytest.approx(v, rel=1e-3) for v in ref)


def test_the_95_percent_interval_covers_the_true_alpha_at_least_90_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = {"alpha": 0, "E": 0}
    for repeat in range(100):
        fit = fit_with_bootstrap(*synthetic(budgets=4, seeds=2, noise=0.01, rng=rng), n_boot=300, seed=repeat)
        for name in covered:
            low, high = fit.interval(name)
            covered[name] += low <= getattr(TRUE, name) <= high
    assert covered["alpha"] >= 90 and covered["E"] >= 90, covered


def test_a_loss_that_rises_with_compute_has_no_law():
    from micro_arch.ladder.report import analyse, fits_table

    C = np.repeat([1e9, 1e10, 1e11], 2)
    with pytest.raises(MicroArchError, match="does not fall with compute"):
        fit_with_bootstrap(C, 2.0 + 1e-12 * C)
    import pandas as pd

    points = pd.DataFrame({"arch": "up", "budget": C, "seed": [1, 2] * 3, "flops": C, "loss": 2.0 + 1e-12 * C})
    results, _, _ = analyse(points, n_boot=20)
    assert results["up"].fit is None and "does not fall with compute" in results["up"].notes[0]
    assert list(fits_table(results, 1e11)["architecture"]) == ["up"]


def test_crossings_are_where_two_laws_meet():
    a, b = PowerLaw(1.0, 50.0, 0.2), PowerLaw(0.9, 5000.0, 0.5)  # b starts higher and ends lower
    (c,) = crossings(a, b, 1e6, 1e20)
    assert a(c) == pytest.approx(b(c), abs=1e-9) and 1e6 < c < 1e20
    assert crossings(a, PowerLaw(2.0, 50.0, 0.2), 1e6, 1e20) == []


LADDER = """
description: two widths of the tiny experiment
architectures:
  wide: {{experiment: tiny}}
  narrow: {{experiment: tiny, set: {{model.d_model: 16}}}}
budgets: {budgets}
size: {{shapes: [{{}}]}}
seeds: {seeds}
set: {{train.eval_every: 8, train.log_every: 8, train.checkpoint_every: 1000, train.sample.max_new_tokens: 2,
      train.warmup_steps: 2}}
"""


def ladder_file(tmp_path, budgets="[1.0e8, 3.0e8, 1.0e9]", seeds=1):
    make_experiment(tmp_path)
    path = tmp_path / "ladder.yaml"
    path.write_text(textwrap.dedent(LADDER.format(budgets=budgets, seeds=seeds)))
    return path


@pytest.mark.parametrize("budgets, words", [
    ("[1.0e8, 1.0e9]", "at least 3 different"), ("[1.0e8, 2.0e8, 5.0e8]", "span 5x"),
    ("[1.0e9, 3.0e8, 1.0e8]", "from the smallest to the largest"),
])
def test_a_ladder_file_needs_three_budgets_over_ten_x(tmp_path, budgets, words):
    with pytest.raises(MicroArchError, match=words):
        load_ladder(ladder_file(tmp_path, budgets))


def test_a_ladder_file_names_existing_experiments_and_a_shape_per_budget(tmp_path):
    with pytest.raises(MicroArchError, match="no such ladder file"):
        load_ladder(tmp_path / "missing.yaml")
    path = ladder_file(tmp_path)
    path.write_text(path.read_text().replace("experiment: tiny}", "experiment: nowhere}"))
    with pytest.raises(MicroArchError, match="architectures.wide.experiment: nowhere is not an experiment"):
        load_ladder(path)
    (tmp_path / "b").mkdir()
    path = ladder_file(tmp_path / "b")
    path.write_text(path.read_text().replace("size: {shapes: [{}]}", "size: {shapes: [{}, {}]}"))
    with pytest.raises(MicroArchError, match="2 shapes for 3 budgets"):
        load_ladder(path)


def test_tokens_per_parameter_picks_the_closest_shape_for_each_budget(tmp_path):
    from micro_arch.ladder.train import model_size, plan_points

    path = ladder_file(tmp_path, "[1.0e8, 3.0e9, 1.0e11]")
    shapes = "[{model.d_model: 16}, {model.d_model: 32}, {model.d_model: 64}]"
    path.write_text(path.read_text().replace("size: {shapes: [{}]}", f"size: {{shapes: {shapes}, tokens_per_parameter: 2}}"))
    ladder = load_ladder(path)
    points = [p for p in plan_points(ladder, tmp_path / "runs") if p.arch == "wide"]
    for p in points:
        chosen = next(o for o in p.overrides if o.startswith("model.d_model="))
        ratios = {}
        for d in (16, 32, 64):
            params, flops = model_size(str(tmp_path / "tiny"), [f"model.d_model={d}"])
            ratios[d] = abs(np.log(p.budget / flops / params / 2))
        assert chosen == f"model.d_model={min(ratios, key=ratios.get)}"
    assert len({next(o for o in p.overrides if o.startswith("model.d_model=")) for p in points}) > 1


def test_a_resumed_ladder_trains_nothing_twice_and_reports(tmp_path, monkeypatch):
    import micro_arch.commands.run as run_module
    from micro_arch.cli import main
    from micro_arch.ladder.command import ladder_command

    path = ladder_file(tmp_path)
    real, trained = run_module.run_experiment, []

    def counted(target, **kw):
        if len(trained) == 2 and not getattr(counted, "stopped", False):
            counted.stopped = True
            raise KeyboardInterrupt  # the ladder is stopped while its third point trains
        trained.append(kw.get("into") or kw.get("resume"))
        return real(target, **kw)

    monkeypatch.setattr(run_module, "run_experiment", counted)
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        ladder_command(path, runs_root=runs, n_boot=50)
    first = list(trained)
    assert len(first) == 2
    root = ladder_command(path, runs_root=runs, n_boot=50)
    assert len(trained) == 6 and not set(trained[2:]) & set(first)  # the other four points, once each
    assert len(set(trained)) == 6
    main(["ladder", str(path), "--runs-dir", str(runs)])  # a third time: every point is completed
    assert len(trained) == 6
    fits = json.loads((root / "fits.json").read_text())
    assert set(fits) == {"wide", "narrow"} and all(f["alpha"] > 0 for f in fits.values())
    md = (root / "ladder.md").read_text()
    assert "## Honesty check" in md and "the law predicts" in md and "## Crossings" in md
    assert "at 1e+09 FLOPs: means " in md and "no winner: one seed per point" in md
    assert (root / "ladder.png").stat().st_size > 10_000
    # a changed ladder file does not silently mix with the trained points
    path.write_text(path.read_text().replace("train.warmup_steps: 2", "train.warmup_steps: 3"))
    with pytest.raises(MicroArchError, match="trained with other settings"):
        ladder_command(path, runs_root=runs, n_boot=50)
