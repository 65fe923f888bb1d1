"""Sweeps with several workers on one study: journal, SQLite and a real PostgreSQL server; exact n_trials,
a grid point trained once, a worker killed mid-trial, Ctrl-C and a restart with more workers."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import sweep_experiment
from optuna.trial import TrialState

from micro_arch.sweep import budget
from micro_arch.sweep.full import Job, placement, run_side_by_side
from micro_arch.sweep.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["train.batch_size=4", "train.seq_len=16", "train.eval_every=100", "train.eval_batches=1",
            "train.log_every=100", "train.warmup_steps=1", "train.sample.max_new_tokens=2", "train.device=cpu",
            "model.n_heads=2", "model.d_model=16", "train.checkpoint_every=1000"]
LRS = [1e-3, 2e-3, 3e-3, 4e-3]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def sweep_file(tmp_path):
    """A tmp experiment and a sweep over four learning rates; write(**changes) writes the sweep file."""
    exp = sweep_experiment(tmp_path)

    def write(**changes) -> Path:
        sweep = {"experiment": str(exp), "n_trials": 4, "trial_steps": 4, "sampler": "grid", "seed": 0,
                 "pruner": "none", "top_k": 0, "set": SETTINGS, "heartbeat_s": 1, "max_retries": 2,
                 "search_space": {"train.lr": {"type": "categorical", "choices": LRS}}} | changes
        path = tmp_path / "w.yaml"
        path.write_text(yaml.safe_dump(sweep))
        return path

    return write


def cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "micro_arch", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(p: subprocess.Popen, timeout=400) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def trials_of(url: str, name="w") -> list:
    return optuna.load_study(study_name=name, storage=open_storage(url, 1, 2)).get_trials(deepcopy=False)


def wait_for_a_training_trial(url: str, folder: Path, timeout=240):
    """The first RUNNING trial whose proxy run has started writing (its run directory exists)."""
    end = time.time() + timeout
    while time.time() < end:
        for t in trials_of(url) if (folder / "trials").exists() else []:
            if t.state == TrialState.RUNNING and "pid" in t.user_attrs and \
                    list((folder / "trials" / f"{t.number:04d}").glob("*/*/config.yaml")):
                return t
        time.sleep(0.2)
    raise AssertionError("no trial started training")


def check_exact(trials, n: int) -> list:
    """n counted trials, all complete, each trained once in its own run directory; none of the others trained."""
    ledger = budget.Ledger(trials)
    counted = [t for t in trials if ledger.counted(t)]
    assert len(counted) == n and all(t.state == TrialState.COMPLETE for t in counted), [(t.number, t.state) for t in trials]
    for t in counted:
        assert len(list(Path(t.user_attrs["runs_root"]).glob("*/*/summary.json"))) == 1
    for t in trials:
        if t.user_attrs.get("skipped"):
            assert "runs_root" not in t.user_attrs  # stepped aside before anything trained
    return counted


# --- the decisions, without training --------------------------------------------------------------------


def test_a_grid_point_queued_twice_by_two_workers_is_trained_once(tmp_path):
    """Two workers that both saw the queue empty enqueue every point; each point still trains once."""
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path / 'j.log'}", 60, 2))
    grid = {"lr": LRS}
    trials = study.get_trials(deepcopy=False)
    for worker in range(2):  # both read the study before either enqueued
        assert budget.enqueue_grid(study, trials, grid, n_trials=4, seed=worker) == 4
    trained = []
    while any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        trial = study.ask()
        lr = trial.suggest_categorical("lr", LRS)
        mine = study._storage.get_trial(trial._trial_id)
        why = budget.Ledger(study.get_trials(deepcopy=False)).reason_to_step_aside(mine, 4, grid=True)
        if why:
            trial.set_user_attr("skipped", why)
            study.tell(trial, state=TrialState.FAIL)
        else:
            trained.append(lr)
            study.tell(trial, 0.0)
    assert sorted(trained) == LRS
    assert budget.done(study.get_trials(deepcopy=False)) == 4


def test_trials_started_at_once_past_n_trials_step_aside(tmp_path):
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path / 'j.log'}", 60, 2))
    started = [study.ask() for _ in range(3)]  # three workers asked at once; n_trials is 2
    trials = study.get_trials(deepcopy=False)
    reasons = [budget.Ledger(trials).reason_to_step_aside(trials[t.number], 2, grid=False) for t in started]
    assert reasons == [None, None, "surplus"]


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_trial_without_heartbeat_is_failed_and_retried_a_bounded_number_of_times(tmp_path, kind):
    url = f"journal:{tmp_path / 'j.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    storage = open_storage(url, heartbeat_s=1, max_retries=1)
    study = optuna.create_study(storage=storage)
    for attempt in range(2 if kind == "journal" else 1):  # (the bound is the same code for both)
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        storage.record_heartbeat(trial._trial_id)
        if kind == "journal":  # its last heartbeat long ago
            storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time() - 100)
        else:  # SQLite records the database's own time: wait out the grace period (3 x heartbeat_s)
            time.sleep(4.2)  # (its clock counts whole seconds)
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        assert trials[trial.number].state == TrialState.FAIL
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        assert len(waiting) == (1 if attempt == 0 else 0)  # max_retries=1: queued again once, then given up
    trials = study.get_trials(deepcopy=False)
    assert trials[1].params == trials[0].params  # the retry runs the same configuration
    ledger = budget.Ledger(trials)
    if kind == "journal":  # the retried one not counted; the last failure, out of retries, is
        assert [ledger.counted(t) for t in trials] == [False, True]
    else:
        assert not ledger.counted(trials[0]) and ledger.live(trials[1])


def test_full_trainings_go_side_by_side_only_when_each_fits_one_gpu():
    small, big = (Job(0, {}, 1.0, [], Path("."), memory_mb=m) for m in (1_000.0, 50_000.0))
    assert placement([small, small], [24_000.0] * 4, None) == "side by side"
    assert placement([small, big], [24_000.0] * 4, None) == "ddp"
    assert placement([small], [80_000.0], None) == "here"
    assert placement([small], [], None) == "here"
    assert placement([small], [24_000.0] * 8, ["--nnodes=2"]) == "ddp"


# --- real processes --------------------------------------------------------------------------------------


def test_full_trainings_side_by_side_run_as_processes_at_once(sweep_file, tmp_path, monkeypatch):
    """The path that puts one full training on each GPU, run on two CPU slots: both train, in parallel (the
    second process starts before the first has ended: seen from the processes' own lifetimes, which a busy
    machine stretches, not from their training, which takes a fraction of a second)."""
    import subprocess
    import time

    from micro_arch.sweep.config import load_sweep
    from micro_arch.sweep.objective import budget_overrides

    lives = []

    class Timed(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.life = [time.monotonic(), None]
            lives.append(self.life)

        def poll(self):
            code = super().poll()
            if code is not None and self.life[1] is None:
                self.life[1] = time.monotonic()
            return code

    monkeypatch.setattr(subprocess, "Popen", Timed)
    sweep = load_sweep(sweep_file())
    jobs = [Job(i, {"train.lr": lr}, 1.0, SETTINGS + [f"train.lr={lr}"] + budget_overrides(3, None),
                tmp_path / "full" / f"{i:04d}") for i, lr in enumerate(LRS[:2])]
    from rich.console import Console

    run_side_by_side(jobs, [{"OMP_NUM_THREADS": "1", "SLOT": "a"}, {"OMP_NUM_THREADS": "1", "SLOT": "b"}], sweep,
                     Console())
    for job in jobs:
        (summary,) = job.folder.glob("tinyexp/*/summary.json")
        assert '"status": "completed"' in summary.read_text()
    (start0, end0), (start1, end1) = lives
    assert start1 < end0 and start0 < end1  # each started before the other finished


def test_two_workers_on_a_journal_finish_exactly_n_trials_each_grid_point_once(sweep_file, tmp_path):
    url = f"journal:{tmp_path / 'study.log'}"
    finish(cli("sweep", sweep_file(trial_steps=40), "--workers", 2, "--storage", url, "--runs-dir", tmp_path / "runs"))
    trials = trials_of(url)
    counted = check_exact(trials, 4)
    assert sorted(t.params["train.lr"] for t in counted) == LRS
    assert len({t.user_attrs["pid"] for t in counted}) == 2  # both workers ran trials
    assert all(t.user_attrs["wait_s"] >= 0 for t in counted)
    assert "## Workers" in (tmp_path / "runs" / "sweeps" / "w" / "trials.md").read_text()
    header = (tmp_path / "runs" / "sweeps" / "w" / "trials.csv").read_text().splitlines()[0]
    assert all(f"user_attrs_{key}" in header for key in ("worker", "host", "pid", "wait_s"))


def test_a_worker_killed_mid_trial_leaves_the_sweep_to_finish_n_trials(sweep_file, tmp_path):
    path = sweep_file(sampler="random", n_trials=3, trial_steps=60,
                      search_space={"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    folder = tmp_path / "runs" / "sweeps" / "w"
    url = f"sqlite:///{folder / 'study.db'}"
    p = cli("sweep", path, "--workers", 2, "--runs-dir", tmp_path / "runs")
    victim = wait_for_a_training_trial(url, folder)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    out = finish(p)
    assert "exited with code -9" in out
    trials = trials_of(url)
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[victim.number].params
    check_exact(trials, 3)


def test_ctrl_c_then_more_workers_continue_the_same_study(sweep_file, tmp_path):
    path = sweep_file(trial_steps=60)
    folder = tmp_path / "runs" / "sweeps" / "w"
    url = f"sqlite:///{folder / 'study.db'}"
    p = cli("sweep", path, "--runs-dir", tmp_path / "runs", start_new_session=True)
    stopped = wait_for_a_training_trial(url, folder)
    os.killpg(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-2000:]
    assert "start the sweep again" in out
    finish(cli("sweep", path, "--workers", 2, "--runs-dir", tmp_path / "runs"))
    trials = trials_of(url)
    assert trials[stopped.number].user_attrs.get("interrupted")
    counted = check_exact(trials, 4)
    assert sorted(t.params["train.lr"] for t in counted) == LRS  # the stopped point trained after all


# --- a real PostgreSQL server ------------------------------------------------------------------------------


@pytest.fixture
def postgres():
    """A PostgreSQL 15 cluster of its own in a temporary folder, on a unix socket, trust authentication; run
    as 'nobody' when the tests run as root (the server refuses root). Yields the SQLAlchemy URL."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install 'micro-arch[postgres]'")
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # /tmp: a short socket path nobody can reach
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(folder, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    data = folder / "data"

    def pg(*args):
        return subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True, timeout=120)

    made = pg(PG_BIN / "initdb", "-D", data, "-U", "sweeper", "-A", "trust", "--no-sync")
    assert made.returncode == 0, made.stderr
    started = pg(PG_BIN / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "-o",
                 f"-k {folder} -c listen_addresses='' -c fsync=off", "start")
    assert started.returncode == 0, started.stderr + (folder / "log").read_text()
    try:
        yield f"postgresql://sweeper@/postgres?host={folder}"
    finally:
        pg(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_join_one_study_on_postgresql(postgres, sweep_file, tmp_path):
    """As two machines would: two separate sweep commands with the same --storage URL."""
    path = sweep_file(sampler="random", n_trials=4, trial_steps=40,
                      search_space={"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    procs = [cli("sweep", path, "--storage", postgres, "--no-full-training", "--runs-dir", tmp_path / "runs")
             for _ in range(2)]
    for p in procs:
        finish(p)
    trials = trials_of(postgres)
    counted = check_exact(trials, 4)
    assert len({t.user_attrs["pid"] for t in counted}) == 2  # both processes ran trials


def test_workers_are_pinned_one_per_gpu_and_split_what_they_share(monkeypatch):
    from micro_arch.sweep import pool
    from micro_arch.sweep.objective import DEVICE_SHARE_ENV, device_memory_mb, memory_budget_mb

    monkeypatch.setattr(pool, "visible_gpus", lambda: ["3", "5"])  # CUDA_VISIBLE_DEVICES=3,5
    slots = pool.worker_slots(3)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3", "5", "3"]
    assert [s.env[DEVICE_SHARE_ENV] for s in slots] == ["2", "1", "2"]  # GPU 3 holds two workers
    monkeypatch.setattr(pool, "visible_gpus", lambda: [])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [s.env["OMP_NUM_THREADS"] for s in pool.worker_slots(2)] == ["4", "4"]
    import torch

    monkeypatch.setenv(DEVICE_SHARE_ENV, "2")
    cpu = torch.device("cpu")
    assert memory_budget_mb(cpu) == pytest.approx(device_memory_mb(cpu) / 2)


@pytest.mark.parametrize("url, message", [
    ("redis://localhost/0", "unknown kind of storage 'redis'"),
    ("journal:/no/such/folder/study.log", "no folder /no/such/folder for the journal file"),
])
def test_a_bad_storage_url_is_one_line(url, message):
    from micro_arch.errors import MicroArchError

    with pytest.raises(MicroArchError) as err:
        open_storage(url, 60, 2)
    assert message in str(err.value)


def test_a_trial_out_of_memory_despite_the_estimate_is_failed_and_run_again(sweep_file, tmp_path, monkeypatch):
    """The objective is replaced by one that runs out of memory once: that trial fails, is queued again with its
    point (a bounded number of times), and the grid still ends with each point complete once."""
    import torch

    from micro_arch.sweep.config import load_sweep
    from micro_arch.sweep.objective import Objective
    from micro_arch.sweep.worker import run_worker

    calls = []

    def fake(self, trial):
        calls.append(trial.suggest_categorical("train.lr", LRS))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return calls[-1]

    monkeypatch.setattr(Objective, "__call__", fake)
    url = f"journal:{tmp_path / 'study.log'}"
    run_worker(load_sweep(sweep_file()), url, tmp_path / "runs")
    trials = trials_of(url)
    assert trials[0].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    ledger = budget.Ledger(trials)
    assert sorted(t.params["train.lr"] for t in trials if ledger.counted(t)) == LRS


def test_a_sweep_with_a_bad_storage_leaves_no_folder(sweep_file, tmp_path):
    from micro_arch.errors import MicroArchError
    from micro_arch.sweep.study import run_sweep

    with pytest.raises(MicroArchError, match="unknown kind of storage"):
        run_sweep(sweep_file(), storage="redis://localhost/0", runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
