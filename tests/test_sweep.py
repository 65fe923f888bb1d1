"""Sweeps: memory pruning before training, resuming a stopped study, clear errors, the report."""

import csv
import json
import math
import socket
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from helpers import sweep_experiment

from micro_arch.data import prepare_data
from micro_arch.errors import MicroArchError
from micro_arch.experiment import load_experiment, with_vocab
from micro_arch.memory import estimate_memory
from micro_arch.model import registry
from micro_arch.sweep.study import load_sweep, open_study, run_sweep

SETTINGS = ["train.batch_size=4", "train.seq_len=16", "train.max_steps=6", "train.eval_every=3",
            "train.eval_batches=1", "train.log_every=3", "train.warmup_steps=1", "train.sample.max_new_tokens=4",
            "train.device=cpu", "model.n_heads=2"]


@pytest.fixture
def tiny(tmp_path):
    """A tmp experiment on a tmp text file, and a sweep over d_model 16 or 64 whose memory budget lies
    between their two estimates: every d_model=64 trial must be pruned before it trains."""
    exp = sweep_experiment(tmp_path, lines=400)
    small, big = (estimate_memory(with_vocab(load_experiment(exp, SETTINGS + [f"model.d_model={d}"])),
                                  torch.device("cpu")).peak_mb for d in (16, 64))
    assert small < big
    sweep = {"experiment": str(exp), "n_trials": 2, "trial_steps": 6, "sampler": "random", "seed": 3,
             "pruner": "median", "memory_budget_mb": (small + big) / 2, "top_k": 0, "set": SETTINGS,
             "search_space": {"model.d_model": {"type": "categorical", "choices": [16, 64]},
                              "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path, tmp_path / "runs"


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_prunes_over_budget_resumes_and_reports(tiny):
    path, runs = tiny
    run_sweep(path, runs_root=runs)  # 2 trials
    folder = runs / "sweeps" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")
    assert len(study.trials) == 2
    # a sweep killed mid-trial leaves a RUNNING trial of a dead process of this machine: failed, not counted,
    # and run again in its place (Optuna's retry callback)
    killed = open_study(load_sweep(path), runs).ask()
    killed.set_user_attr("host", socket.gethostname())
    killed.set_user_attr("pid", dead_pid())
    run_sweep(path, overrides=["top_k=1", "full_steps=3"], n_trials=5, runs_root=runs)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")
    trials = study.trials
    assert trials[2].state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 2]  # queued again by Optuna's callback
    assert retry.state != optuna.trial.TrialState.FAIL
    counted = [t for t in trials if t.number != 2]
    assert len(counted) == 5, [t.state for t in trials]  # grew to the target: 2 + 3, not restarted
    pruned = [t for t in counted if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in counted if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete
    for t in pruned:
        if t.params["model.d_model"] == 64:  # over budget: stopped before any training step
            assert t.user_attrs["memory_estimate_mb"] > t.user_attrs["memory_budget_mb"]
            assert not (folder / "trials" / f"{t.number:04d}").exists()
    for t in complete:
        assert t.params["model.d_model"] == 16
        assert t.user_attrs["memory_estimate_mb"] <= t.user_attrs["memory_budget_mb"]
        summary = json.loads((folder / "trials" / f"{t.number:04d}" / "tinyexp").glob("*/summary.json")
                             .__next__().read_text())
        assert summary["final_val_loss"] == pytest.approx(t.value)
        assert summary["steps"] == 6
    assert any(t.params["model.d_model"] == 64 for t in pruned)
    for name in ("study.db", "trials.csv", "trials.md", "history.png", "importances.json"):
        assert (folder / name).is_file(), name
    assert "memory_estimate_mb" in (folder / "trials.csv").read_text()
    # the best trial trained in full, in its own run directory under runs/sweeps/<name>/full/<trial>/
    finals = json.loads((folder / "full_runs.json").read_text())
    assert [f["trial"] for f in finals] == [study.best_trial.number]
    (full,) = [json.loads(p.read_text()) for p in (folder / "full").glob("*/tinyexp/*/summary.json")]
    assert full["steps"] == 3 and full["status"] == "completed"


SIGINT_BLOCK = '''
import os
import signal

import torch
from torch import nn

from micro_arch.model.registry import register_block

calls = 0


@register_block("zz_sigint_once", kind="other")
class SigintOnce(nn.Module):
    """The identity that sends Ctrl-C to its own process at the third real training forward of the process."""

    def forward(self, x, state=None):
        global calls
        if self.training and type(x) is torch.Tensor:  # not under the memory estimate's fake tensors
            calls += 1
            if calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return x
'''


ARMED_SIGINT_BLOCK = SIGINT_BLOCK.replace("if self.training and type(x) is torch.Tensor:",
                                         "if self.training and type(x) is torch.Tensor and os.environ.get('ZZ_ARMED'):")


def sigint_sweep(tiny, monkeypatch, request, block=SIGINT_BLOCK, **changes):
    """The tiny sweep over an experiment whose third training forward in this process sends Ctrl-C."""
    registry.load_all()  # the signalling block must not outlive the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    request.addfinalizer(lambda: [sys.modules.pop(m) for m in list(sys.modules)
                                  if m.startswith("micro_arch_experiment_blocks.sigint_exp")])
    path, runs = tiny
    exp = path.parent / "sigint_exp"
    exp.mkdir()
    config = yaml.safe_load((path.parent / "tinyexp" / "config.yaml").read_text())
    config["model"]["layers"] = [{"spec": "Norm->Attn->+->Norm->MLP->zz_sigint_once->+"}]
    (exp / "config.yaml").write_text(yaml.safe_dump(config))
    (exp / "blocks.py").write_text(block)
    sweep = yaml.safe_load(path.read_text())
    sweep["experiment"], sweep["search_space"]["model.d_model"]["choices"] = str(exp), [16]  # every trial trains
    path.write_text(yaml.safe_dump(sweep | changes))
    return path, runs


def test_a_trial_stopped_by_ctrl_c_is_not_counted_and_the_sweep_says_how_to_continue(tiny, capsys, monkeypatch,
                                                                                        request):
    path, runs = sigint_sweep(tiny, monkeypatch, request)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, overrides=["n_trials=2"], runs_root=runs)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"start the sweep again: micro-arch sweep {path} --set n_trials=2" in printed, printed
    run_sweep(path, overrides=["n_trials=2"], runs_root=runs)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{runs / 'sweeps' / 'tiny' / 'study.db'}")
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].state == optuna.trial.TrialState.FAIL
    assert len(study.trials) == 3  # the interrupted one, then the sweep's n_trials=2 in full


def test_a_grid_sweep_trains_each_point_once_however_often_it_is_started(tiny):
    path, runs = tiny
    sweep = yaml.safe_load(path.read_text())
    sweep |= {"sampler": "grid", "n_trials": 5, "pruner": "none",
              "search_space": {"model.d_model": {"type": "categorical", "choices": [16]},
                               "train.lr": {"type": "categorical", "choices": [1e-3, 2e-3]}}}
    path.write_text(yaml.safe_dump(sweep))
    for _ in range(2):
        run_sweep(path, runs_root=runs)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{runs / 'sweeps' / 'tiny' / 'study.db'}")
    assert sorted(t.params["train.lr"] for t in study.trials) == [1e-3, 2e-3]


def test_a_grid_point_whose_trial_was_stopped_is_trained_when_the_sweep_starts_again(tiny, monkeypatch, request):
    """Optuna's grid sampler takes a failed trial's point as visited: the stopped point must be run again,
    and no other point twice."""
    space = {"model.d_model": {"type": "categorical", "choices": [16]},
             "train.lr": {"type": "categorical", "choices": [1e-3, 2e-3, 3e-3]}}
    path, runs = sigint_sweep(tiny, monkeypatch, request, sampler="grid", n_trials=3, pruner="none",
                              search_space=space, top_k=0)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, runs_root=runs)
    run_sweep(path, runs_root=runs)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{runs / 'sweeps' / 'tiny' / 'study.db'}")
    stopped = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(stopped) == 1
    trained = [t.params["train.lr"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(trained) == [1e-3, 2e-3, 3e-3], trained


def test_a_bits_per_byte_sweep_prunes_on_bits_per_byte(tiny):
    """Trials with different tokenizers are comparable per byte, not per token: what the pruner sees is the
    held-out loss converted with the trial's own tokens per byte."""
    path, runs = tiny
    sweep = yaml.safe_load(path.read_text())
    sweep |= {"objective": "bits_per_byte", "n_trials": 1, "search_space": {
        "model.d_model": {"type": "categorical", "choices": [16]}, "data.tokenizer": {"type": "categorical",
                                                                                      "choices": ["bpe"]}},
        "set": sweep["set"] + ["data.vocab_size=320"], "memory_budget_mb": None}
    path.write_text(yaml.safe_dump(sweep))
    study = run_sweep(path, runs_root=runs)
    (trial,) = study.trials
    data = prepare_data(with_vocab(load_experiment(sweep["experiment"], sweep["set"] + ["data.tokenizer=bpe"])).data)
    (run_dir,) = (runs / "sweeps" / "tiny" / "trials" / "0000" / "tinyexp").iterdir()
    with open(run_dir / "metrics.csv") as f:
        val_losses = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]}
    per_byte = len(data.val) / (math.log(2) * data.val_bytes)
    assert data.val_bytes > 1.5 * len(data.val)  # BPE: tokens of several bytes, so the units differ
    assert trial.intermediate_values == pytest.approx({k: v * per_byte for k, v in val_losses.items()})


@pytest.mark.parametrize("space, message", [
    ({"model.d_modl": {"type": "int", "low": 16, "high": 32}}, "search_space.model.d_modl: unknown config key 'd_modl'"),
    ({"model.d_modl": {"type": "int", "low": 16, "high": 32}}, "did you mean: d_model"),
    ({"model.layers.3.repeat": {"type": "int", "low": 1, "high": 2}}, "search_space.model.layers.3.repeat"),
    ({"model.d_model": {"type": "int", "low": 64, "high": 16}}, "search_space.model.d_model: low=64.0 is above high=16.0"),
    ({"model.d_model": {"type": "integer", "low": 16, "high": 32}}, "search_space.model.d_model.type"),
    ({"model.d_model": {"type": "int", "low": 16, "hihg": 32}}, "unknown key 'hihg'"),
    ({"train.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}, "search_space.train.lr: a log range"),
    ({"model.positions": {"type": "categorical", "choices": ["rope", "alibi"]}}, "search_space.model.positions: value 'alibi'"),
    ({"train.lr": {"type": "categorical", "choices": []}}, "search_space.train.lr: a categorical range needs"),
])
def test_malformed_search_space_names_the_key(tiny, space, message):
    path, _ = tiny
    sweep = yaml.safe_load(path.read_text())
    sweep["search_space"] = space
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(MicroArchError) as err:
        load_sweep(path)
    assert message in str(err.value)


def test_repository_sweep_files_are_valid():
    for name in ("sweeps/tiny.yaml", "sweeps/shakespeare-width.yaml"):
        assert load_sweep(name).search_space


@pytest.mark.parametrize("how", ["file", "set", "argument"])
def test_zero_trials_is_an_error_before_anything_is_written(tiny, how):
    path, runs = tiny
    sweep = yaml.safe_load(path.read_text())
    if how == "file":
        sweep["n_trials"] = 0
        path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(MicroArchError) as err:
        run_sweep(path, overrides=["n_trials=0"] if how == "set" else None, n_trials=0 if how == "argument" else None,
                  runs_root=runs)
    assert "n_trials" in str(err.value) and "at least 1" in str(err.value)
    assert not runs.exists()


def test_a_sweep_stopped_during_its_full_training_resumes_that_run(tiny, monkeypatch, request, capsys):
    """Issue 25.12: started again, the sweep continues the interrupted full run instead of starting another."""
    path, runs = sigint_sweep(tiny, monkeypatch, request, block=ARMED_SIGINT_BLOCK, n_trials=1, full_steps=12)
    run_sweep(path, overrides=["top_k=0"], runs_root=runs)  # the trial
    monkeypatch.setenv("ZZ_ARMED", "1")  # Ctrl-C at the third step of the full training
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, overrides=["top_k=1"], runs_root=runs)
    monkeypatch.delenv("ZZ_ARMED")
    capsys.readouterr()
    run_sweep(path, overrides=["top_k=1"], runs_root=runs)
    assert "resuming" in capsys.readouterr().out
    full = [p for p in runs.rglob("summary.json") if "trials" not in p.parts]
    assert len(full) == 1, full  # one full run: resumed, not orphaned
    summary = json.loads(full[0].read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    finals = json.loads((runs / "sweeps" / "tiny" / "full_runs.json").read_text())
    assert [f["run_dir"] for f in finals] == [str(full[0].parent)]


def test_a_sweep_space_valid_only_in_combination_is_accepted_and_bad_combinations_are_pruned(tiny):
    """Issue 25.17: d_model {48, 64} x n_heads {3}: n_heads=3 is valid with 48 (not with the base d_model),
    so the space is accepted; the trial of 64 x 3 is pruned before it trains, with the reason."""
    path, runs = tiny
    sweep = yaml.safe_load(path.read_text())
    sweep |= {"sampler": "grid", "pruner": "none", "memory_budget_mb": None, "top_k": 0,
              "search_space": {"model.d_model": {"type": "categorical", "choices": [48, 64]},
                               "model.n_heads": {"type": "categorical", "choices": [3]}}}
    path.write_text(yaml.safe_dump(sweep))
    study = run_sweep(path, runs_root=runs)
    by_width = {t.params["model.d_model"]: t for t in study.trials}
    assert by_width[48].state == optuna.trial.TrialState.COMPLETE
    assert by_width[64].state == optuna.trial.TrialState.PRUNED
    assert "not divisible by n_heads=3" in by_width[64].user_attrs["invalid"]
    assert not (runs / "sweeps" / "tiny" / "trials" / f"{by_width[64].number:04d}").exists()


def test_a_value_valid_in_no_combination_is_refused(tiny):
    path, _ = tiny
    sweep = yaml.safe_load(path.read_text())
    sweep["search_space"] = {"model.d_model": {"type": "categorical", "choices": [50, 70]},
                             "model.n_heads": {"type": "categorical", "choices": [3]}}
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(MicroArchError) as err:
        load_sweep(path)
    assert "search_space.model.n_heads: value 3 is not accepted with any combination of the other swept values" \
        in str(err.value)


def test_a_sweep_whose_every_trial_is_pruned_says_the_full_training_is_skipped(tiny, capsys):
    """Issue 25.18: no completed trial, no best configuration: the sweep says so instead of nothing."""
    path, runs = tiny
    run_sweep(path, overrides=["memory_budget_mb=0.001", "top_k=1"], runs_root=runs)
    out = " ".join(capsys.readouterr().out.split())
    assert "no trial completed (2 pruned, 0 failed of 2)" in out
    assert "the full training of the best 1 is skipped" in out
    assert "Skipped: no trial completed" in (runs / "sweeps" / "tiny" / "trials.md").read_text()
