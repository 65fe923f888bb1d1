"""The trainer's pieces: batches prepared ahead are the batches of their step, a stage's loss plugs into
the step, and throughput leaves out the first step (compilation), evaluation and checkpoints."""

import json

import pytest
import torch
from helpers import read_metrics

from micro_arch.commands.run import run_experiment
from micro_arch.config import DataConfig, TrainConfig
from micro_arch.data import prepare_data, sample_batch
from micro_arch.experiment import load_experiment
from micro_arch.stages import StagePieces, stage_of
from micro_arch.train.distributed import Dist
from micro_arch.train.loop import Trainer
from micro_arch.train.prefetch import Prefetcher, TokenWindows
from micro_arch.train.step import lm_loss


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataConfig())


def test_prefetched_batches_are_the_batches_of_their_step(data):
    cfg = TrainConfig(batch_size=3, seq_len=16, grad_accum=2, seed=5)
    prefetcher = Prefetcher(TokenWindows(data.train, cfg, rank=1, world_size=2), 2, torch.device("cpu"))
    prefetcher.prepare(4)
    for step in (4, 5, 9):  # 4 was prepared ahead, 5 and 9 were not
        got = prefetcher.take(step)
        assert len(got) == 2
        for micro, (x, y) in enumerate(got):
            ex, ey = sample_batch(data.train, 3, 16, 5, step * 2 + micro, rank=1, world_size=2)
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_stage_loss_plugs_into_the_step(tmp_path, data, tiny_experiment):
    cfg = load_experiment(tiny_experiment())
    cfg.model.vocab_size = data.tokenizer.vocab_size
    seen = []

    def half_loss(model, batch):
        seen.append(batch[0].shape)
        loss, metrics = lm_loss(model, batch)
        return loss * 0.5, {**metrics, "halved": loss.detach() * 0.5}

    plain = Trainer(cfg, data, Dist(), torch.device("cpu"), pieces=stage_of(cfg).pieces(cfg, data, torch.device("cpu")))
    pieces = StagePieces(plain.pieces.source, half_loss, plain.pieces.held_out)
    trainer = Trainer(cfg, data, Dist(), torch.device("cpu"), pieces=pieces)
    metrics = trainer.step_fn(0, trainer.batches.take(0))
    assert seen == [torch.Size([4, 32])]
    torch.testing.assert_close(metrics["halved"], metrics["train_loss"] * 0.5)


def test_throughput_leaves_out_the_first_step_evaluation_and_checkpoints(tmp_path, tiny_experiment):
    exp = tiny_experiment()
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=["train.max_steps=8", "train.log_every=4",
                                                                          "train.eval_every=4"])
    s = json.loads((run_dir / "summary.json").read_text())
    accounts = s["train_time_s"] + s["compile_time_s"] + s["eval_time_s"] + s["checkpoint_time_s"]
    assert s["eval_time_s"] > 0 and s["checkpoint_time_s"] > 0 and accounts <= s["wall_time_s"] + 0.05
    timed_tokens = 7 * 4 * 32  # every step but the first
    # train_time_s is rounded to the millisecond, a few percent of these few steps on a fast machine
    slow, fast = timed_tokens / (s["train_time_s"] + 0.0005), timed_tokens / (s["train_time_s"] - 0.0005)
    assert slow * 0.99 <= s["tokens_per_sec"] <= fast * 1.01


def test_a_log_row_of_only_the_first_step_has_no_throughput_rather_than_zero(tmp_path, tiny_experiment):
    """The first step of a process (a fresh run or a resume) is timed as compilation: a log row whose window
    holds only that step says nothing about throughput (it used to say 0 tok/s)."""
    exp = tiny_experiment()
    steps = ["train.max_steps=4", "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=2"]
    run_dir = run_experiment(exp, runs_root=tmp_path / "runs", overrides=steps)
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == "1" and rows[0]["tokens_per_sec"] == ""  # an empty cell, as val_loss between evals
    assert all(float(r["tokens_per_sec"]) > 0 for r in rows[1:])
    (run_dir / "checkpoints" / "step_0000004.pt").unlink()  # resume from step 2: step 3 is a first step again
    (run_dir / "checkpoints" / "latest.pt").unlink(missing_ok=True)
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=steps, resume=run_dir)
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert list(rows) == ["1", "2", "3", "4"]
    assert rows["3"]["tokens_per_sec"] == "" and float(rows["4"]["tokens_per_sec"]) > 0


def test_no_host_reads_between_log_steps(tmp_path, data, monkeypatch, tiny_experiment):
    """Between log steps the dense path never reads a tensor on the host (on a GPU each read is a stall)."""
    from micro_arch.train import bookkeeping

    cfg = load_experiment(tiny_experiment(), ["train.max_steps=8", "train.log_every=4"])
    cfg.model.vocab_size = data.tokenizer.vocab_size
    trainer = Trainer(cfg, data, Dist(), torch.device("cpu"), pieces=stage_of(cfg).pieces(cfg, data, torch.device("cpu")))
    hot, reads = [False], []

    def reading(name, original):
        def read(self, *args):
            if hot[0]:
                reads.append(name)
            return original(self, *args)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, reading(name, getattr(torch.Tensor, name)))

    def cold(method):
        original = getattr(bookkeeping.Bookkeeper, method)

        def run(self, *args, **kwargs):
            hot[0] = False
            try:
                return original(self, *args, **kwargs)
            finally:
                hot[0] = True
        monkeypatch.setattr(bookkeeping.Bookkeeper, method, run)

    for method in ("_log_row", "_evaluate", "_stop_if_diverged", "save", "write_summary", "__exit__"):
        cold(method)
    original_enter = bookkeeping.Bookkeeper.__enter__

    def enter(self):
        result = original_enter(self)
        hot[0] = True
        return result
    monkeypatch.setattr(bookkeeping.Bookkeeper, "__enter__", enter)
    (tmp_path / "run").mkdir()
    trainer.train(tmp_path / "run")
    hot[0] = False
    assert trainer.step == 8 and reads == []


def test_compile_mode_reaches_torch_compile_and_the_log_window_keeps_its_own_copy(tmp_path, data, monkeypatch, tiny_experiment):
    """train.compile_mode is passed to torch.compile ('default' as torch's own default). With CUDA graphs
    (reduce-overhead) a step's outputs are overwritten by the next replay, so the log window must not keep
    the first step's tensors themselves."""
    from micro_arch.train.bookkeeping import Window
    from micro_arch.train.loop import wrap_model

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    cfg = load_experiment(tiny_experiment(), ["train.compile=true", "train.compile_mode=reduce-overhead"])
    cfg.model.vocab_size = data.tokenizer.vocab_size
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, cfg, Dist(), torch.device("cpu")) is model and seen == [{"mode": "reduce-overhead"}]
    cfg.train.compile_mode = "default"
    wrap_model(model, cfg, Dist(), torch.device("cpu"))
    assert seen[-1] == {"mode": None}

    window, out = Window({}), torch.tensor(2.0)
    window.add({"train_loss": out})
    out.fill_(100.0)  # what the next replay of a CUDA graph does to its output buffer
    window.add({"train_loss": torch.tensor(4.0)})
    assert window.read(Dist(), torch.device("cpu")) == {"train_loss": 3.0}
