"""Seeds as an axis: seed groups, their ids, their resume, and a data order held apart from the init seed."""

import json

import pytest
import torch

from micro_arch.commands import seeds as seeds_module
from micro_arch.commands.seeds import group_folder, member_state, run_group, seed_list
from micro_arch.config import load_config
from micro_arch.errors import MicroArchError
from micro_arch.rundir import group_id
from micro_arch.train.loop import planned_steps, tokens_per_step, training_flops_per_token
from micro_arch.train.prefetch import TokenWindows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_seed_list_counts_from_the_experiments_seed_or_takes_a_list():
    assert seed_list("3", 1337) == [1337, 1338, 1339]
    assert seed_list("1,5,9", 1337) == [1, 5, 9]
    assert seed_list("7,", 1337) == [7]
    for bad in ("0", "x", "1,1", "1,a"):
        with pytest.raises(MicroArchError, match="--seeds"):
            seed_list(bad, 0)


def test_group_id_ignores_the_seed_and_cadences_but_not_the_configuration(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    base = group_id(load_config(exp))
    assert group_id(load_config(exp, ["train.seed=5", "train.eval_every=3", "train.device=cpu"])) == base
    assert group_id(load_config(exp, ["model.d_model=48"])) != base
    assert group_id(load_config(exp, ["train.lr=0.002"])) != base
    assert group_id(load_config(exp, ["train.data_seed=1"])) != base  # a fixed data order is another design
    cfg = load_config(exp)
    cfg.train.budget_flops = 1e9
    assert group_id(cfg) != base


def test_data_seed_holds_the_data_order_while_the_seed_changes(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    tokens = torch.arange(5000) % 97

    def first_batch(*overrides):
        return TokenWindows(tokens, load_config(exp, list(overrides)).train).batch(0)[0]

    assert torch.equal(first_batch("train.seed=1", "train.data_seed=9"), first_batch("train.seed=2", "train.data_seed=9"))
    assert not torch.equal(first_batch("train.seed=1"), first_batch("train.seed=2"))
    assert torch.equal(first_batch("train.seed=9"), first_batch("train.seed=1", "train.data_seed=9"))


def test_budgets_replace_max_steps(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    cfg = load_config(exp, ["train.budget_tokens=1000", "model.vocab_size=65"])
    assert planned_steps(cfg, 1) == -(-1000 // tokens_per_step(cfg, 1)) == 8  # 4 x 32 tokens per step
    assert planned_steps(load_config(exp, ["train.budget_tokens=128e2"]), 1) == 100  # YAML reads 128e2 as text
    cfg = load_config(exp, ["train.budget_flops=3e9", "model.vocab_size=65"])
    per_step = training_flops_per_token(cfg) * tokens_per_step(cfg, 1)
    assert planned_steps(cfg, 1) == int(-(-3e9 // per_step))
    assert (planned_steps(cfg, 1) - 1) * per_step < 3e9 <= planned_steps(cfg, 1) * per_step
    with pytest.raises(MicroArchError, match="set together; a run has one budget"):
        load_config(exp, ["train.budget_tokens=1000", "train.budget_flops=1e9"])
    with pytest.raises(MicroArchError, match="budget_flops: must be positive"):
        load_config(exp, ["train.budget_flops=-1"])


def test_a_seed_group_trains_each_seed_in_its_own_folder_and_resumes_only_what_is_unfinished(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    overrides = ["train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=4",
                 "train.sample.max_new_tokens=2"]
    group = run_group(exp, seeds="3,4", overrides=overrides, runs_root=tmp_path / "runs")
    summaries = [json.loads((group / f"seed-{s}" / "summary.json").read_text()) for s in (3, 4)]
    assert [s["seed"] for s in summaries] == [3, 4]
    assert summaries[0]["group"] == summaries[1]["group"] and summaries[0]["status"] == "completed"
    assert summaries[0]["final_val_loss"] != summaries[1]["final_val_loss"]  # another init: another result
    assert json.loads((group / "group.json").read_text())["seeds"] == [3, 4]
    assert group_folder(group / "seed-4") == group and group_folder(tmp_path) is None

    # seed 4 lost everything; seed 3 is complete: a resume from a member trains seed 4 alone
    kept = (group / "seed-3" / "checkpoints" / "latest.pt").stat().st_mtime_ns
    for path in sorted((group / "seed-4").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    assert member_state(group / "seed-4") == "fresh"
    run_group(exp, overrides=overrides, resume=group / "seed-3", runs_root=tmp_path / "runs")
    assert (group / "seed-3" / "checkpoints" / "latest.pt").stat().st_mtime_ns == kept
    assert json.loads((group / "seed-4" / "summary.json").read_text())["status"] == "completed"

    # a longer budget extends every member; another model is refused before anything trains
    longer = [o for o in overrides if not o.startswith("train.max_steps=")] + ["train.max_steps=12"]
    run_group(exp, overrides=longer, resume=group, runs_root=tmp_path / "runs")
    assert [json.loads((group / f"seed-{s}" / "summary.json").read_text())["steps"] for s in (3, 4)] == [12, 12]
    with pytest.raises(MicroArchError, match=r"keeps its model, data and training settings \(model.d_model: the run has 32\)"):
        run_group(exp, overrides=[*longer, "model.d_model=16"], resume=group, seeds="3,4,5", runs_root=tmp_path)
    assert not (group / "seed-5").exists()


def test_a_group_resume_continues_an_interrupted_member_from_its_checkpoint(tmp_path, monkeypatch, tiny_experiment):
    exp = tiny_experiment()
    group = tmp_path / "g"
    (group / "seed-1" / "checkpoints").mkdir(parents=True)
    (group / "seed-1" / "checkpoints" / "latest.pt").write_bytes(b"x")
    (group / "seed-2").mkdir()
    (group / "seed-2" / "summary.json").write_text('{"status": "completed"}')
    (group / "group.json").write_text(json.dumps({"seeds": [1, 2, 3]}))
    calls = []
    monkeypatch.setattr("micro_arch.commands.run.run_experiment", lambda target, **kw: calls.append(kw))
    run_group(exp, resume=group, runs_root=tmp_path)
    assert [(c["overrides"], c["resume"], c["into"]) for c in calls] == [
        (["train.seed=1"], group / "seed-1", None), (["train.seed=3"], None, group / "seed-3")]
    with pytest.raises(MicroArchError, match="not a seed group"):
        run_group(exp, resume=tmp_path / "elsewhere")
    with pytest.raises(MicroArchError, match="drop the override"):
        run_group(exp, seeds="2", overrides=["train.seed=4"])


def test_side_by_side_members_see_one_gpu_each(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert seeds_module.gpus_for("auto") == ["3", "5"] == seeds_module.gpus_for("cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert seeds_module.gpus_for("auto") == ["0", "1"]
    assert seeds_module.gpus_for("cpu") == [] == seeds_module.gpus_for("cuda:1")  # the user chose the device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert seeds_module.gpus_for("auto") == []


def test_a_sweeps_trial_budget_outranks_an_experiments_flop_budget(tmp_path, tiny_experiment):
    from micro_arch.sweep.objective import budget_overrides

    exp = tiny_experiment()
    cfg = load_config(exp, ["train.budget_flops=1e12", "model.vocab_size=65", *budget_overrides(10, None)])
    assert planned_steps(cfg, 1) == 10
    cfg = load_config(exp, ["train.budget_flops=1e12", "model.vocab_size=65", *budget_overrides(None, 1280)])
    assert planned_steps(cfg, 1) == 10  # 1280 tokens of 4 x 32


def test_a_completed_budget_run_says_how_to_train_it_further(tmp_path, capsys, tiny_experiment):
    import shlex

    from micro_arch.commands.run import run_experiment

    exp = tiny_experiment()
    quiet = ["train.sample.max_new_tokens=2", "train.eval_every=4", "train.log_every=4"]
    run = run_experiment(exp, overrides=[*quiet, "train.budget_tokens=512"], runs_root=tmp_path / "runs")
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    capsys.readouterr()
    run_experiment(exp, overrides=[*quiet, "train.budget_tokens=512"], resume=run, runs_root=tmp_path / "runs")
    command = " ".join(capsys.readouterr().out.split()).split("e.g. ")[1].split(" run directory")[0]
    args = shlex.split(command)
    overrides = args[args.index("--set") + 1:]
    assert "train.budget_tokens=null" in overrides and "train.max_steps=8" in overrides
    run_experiment(exp, overrides=overrides, resume=run, runs_root=tmp_path / "runs")
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_side_by_side_trains_each_job_in_its_own_process_and_reports_failures(tmp_path, monkeypatch, tiny_experiment):
    """The several-GPU path, on a CPU: two `micro-arch run` processes at once, each told its own device."""
    import subprocess

    from micro_arch.commands.seeds import Job, side_by_side

    real, seen = subprocess.Popen, {}

    def popen(args, env=None, **kw):
        seen[args[args.index("--into") + 1]] = env["CUDA_VISIBLE_DEVICES"]
        return real(args, env=env, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    exp = tiny_experiment()
    quick = ["train.max_steps=4", "train.eval_every=4", "train.sample.max_new_tokens=2", "train.device=cpu"]
    jobs = [Job(f"seed {s}", str(exp), [*quick, f"train.seed={s}"], tmp_path / "g" / f"seed-{s}", "fresh")
            for s in (1, 2)]
    side_by_side(jobs, tmp_path / "runs", gpus=["0", "1"])
    for s, gpu in ((1, "0"), (2, "1")):
        assert seen[str(tmp_path / "g" / f"seed-{s}")] == gpu
        summary = json.loads((tmp_path / "g" / f"seed-{s}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["seed"] == s
        assert (tmp_path / "g" / f"seed-{s}.log").is_file()
    bad = Job("broken", str(exp), [*quick, "model.d_model=-1"], tmp_path / "g" / "seed-3", "fresh")
    with pytest.raises(MicroArchError, match=r"1 run\(s\) failed: broken \(exit code 2"):
        side_by_side([bad], tmp_path / "runs", gpus=["0", "1"])
