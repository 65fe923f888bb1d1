"""`micro-arch compare`: the report's numbers, its fairness rules and run directories it cannot compare."""

import csv
import html
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import run_cli

from micro_arch.commands.run import run_experiment
from micro_arch.data.corpus import read_works
from micro_arch.errors import MicroArchError
from micro_arch.report.compare import compare
from micro_arch.report.fairness import assess, rank, standard_error

TINY = """
model:
  d_model: 32
  n_heads: 2
  max_seq_len: 32
  layers: [{{spec: "Norm->Attn->+->Norm->MLP->+", repeat: 2}}]
data: {{source: {corpus}, tokenizer: {tokenizer}, vocab_size: 400}}
train:
  batch_size: 8
  seq_len: 32
  max_steps: {steps}
  warmup_steps: 4
  lr: 3.0e-3
  min_lr: 3.0e-4
  eval_every: 10
  eval_batches: 2
  log_every: 5
  checkpoint_every: 40
  sample: {{prompts: ["ROMEO:"], max_new_tokens: 8}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs on a small Shakespeare corpus: 'base', 'short' (a fifth of the steps), 'bpe'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(text for _, text in read_works()[:2])[:60_000])
    found = {}
    for name, tokenizer, steps in (("base", "char", 30), ("short", "char", 6), ("bpe", "bpe", 30)):
        folder = root / name
        folder.mkdir()
        (folder / "config.yaml").write_text(textwrap.dedent(TINY.format(corpus=corpus, tokenizer=tokenizer,
                                                                         steps=steps)))
        found[name] = run_experiment(folder, runs_root=root / "runs")
    yield found
    torch.set_num_threads(threads)


def copy_run(run_dir, to, **summary_changes):
    shutil.copytree(run_dir, to)
    summary = json.loads((to / "summary.json").read_text())
    (to / "summary.json").write_text(json.dumps(summary | summary_changes))
    return to


def read_report(folder):
    return (folder / "report.md").read_text(), (folder / "report.html").read_text()


def report_rows(folder):
    with open(folder / "report.csv") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def line_of(text, start):
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


# --- the report from trained runs ---------------------------------------------------------------


def test_report_holds_every_run_with_the_numbers_of_its_summary_and_eval(runs, tmp_path, monkeypatch):
    out = tmp_path / "report"
    compare([runs["base"], runs["short"]], out, at="end")
    md, page = read_report(out)
    for name in ("loss_vs_tokens.png", "loss_vs_time.png", "loss_vs_flops.png"):
        assert (out / name).stat().st_size > 10_000 and f"({name})" in md and f"src='{name}'" in page
    rows = report_rows(out)
    assert set(rows) == {"base", "short"}
    for name in ("base", "short"):
        summary = json.loads((runs[name] / "summary.json").read_text())
        held_out = json.loads((runs[name] / "eval.json").read_text())
        row = rows[name]
        for key in ("params_total", "params_non_embedding", "flops_per_token", "tokens_seen", "wall_time_s",
                    "best_val_loss", "final_val_loss", "tokens_per_sec", "peak_memory_mb"):
            assert float(row[key]) == pytest.approx(summary[key], rel=1e-12), key
        for key, eval_key in (("eval_loss", "val_loss"), ("perplexity", "perplexity"),
                              ("bits_per_byte", "bits_per_byte"), ("top1", "top1"), ("top5", "top5")):
            assert float(row[key]) == pytest.approx(held_out[eval_key], rel=1e-12), key
        se = float(row["eval_loss_se"])
        losses = held_out["batch_losses"]
        mean = sum(losses) / len(losses)
        variance = sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)
        assert se == pytest.approx(math.sqrt(variance / len(losses)))
        for text in (f"{summary['params_total']:,}", f"{summary['tokens_seen']:,}",
                     f"{held_out['val_loss']:.4f}", f"{held_out['bits_per_byte']:.4f}",
                     f"{held_out['top5']:.2%}", summary["layers"][0]["spec"]):
            assert text in md and html.escape(text) in page, text
        (sample,) = json.loads((runs[name] / "samples.json").read_text())
        assert html.escape(sample["prompt"] + sample["text"]).replace("\n", "<br>") in md
    assert line_of(md, "| settings that differ |").endswith("| train.max_steps=30 | train.max_steps=6 |")
    # 30 steps against 6: a gap far beyond the noise of the evaluation batches, but one seed per arm: no
    # winner, since training noise is unknown
    overall = line_of(md, "- Overall, on held-out loss (all runs use the char tokenizer), at the end of training")
    gap = float(rows["short"]["eval_loss"]) - float(rows["base"]["eval_loss"])
    assert f"no winner: short − base = {gap:+.4f} nats" in overall and "one seed each" in overall
    assert "training noise is unknown" in overall and "--seeds 3" in overall and "best" not in overall
    assert "- held-out loss:" not in md and "- bits per byte:" not in md
    assert not line_of(md, "| held-out loss (full split) |").split(" | ")[1].startswith("**")
    assert line_of(md, "| compared at |").endswith("| end (full split) | end (full split) |")

    # a second compare reuses eval.json; a changed checkpoint is evaluated again
    import micro_arch.eval.evaluate

    calls = []
    real = micro_arch.eval.evaluate.evaluate_run
    monkeypatch.setattr(micro_arch.eval.evaluate, "evaluate_run",
                        lambda path, **kw: calls.append(path) or real(path, **kw))
    compare([runs["base"], runs["short"]], tmp_path / "again")
    assert calls == [] and report_rows(tmp_path / "again")["base"]["eval_loss"] == rows["base"]["eval_loss"]
    latest = runs["short"] / "checkpoints" / "latest.pt"
    os.utime(latest, ns=(latest.stat().st_atime_ns, latest.stat().st_mtime_ns + 1_000_000))
    compare([runs["base"], runs["short"]], tmp_path / "third")
    assert calls == [runs["short"]]
    # eval.json written by evaluate_run itself (as `micro-arch eval` does) is reused as well
    real(runs["short"])
    compare([runs["base"], runs["short"]], tmp_path / "fourth")
    assert calls == [runs["short"]]


def test_runs_that_cannot_be_compared_get_a_line_and_the_report_is_still_written(runs, tmp_path):
    base = runs["base"]
    no_summary = copy_run(base, tmp_path / "no-summary")
    (no_summary / "summary.json").unlink()
    running = copy_run(base, tmp_path / "running", status="running", steps=12, pid=os.getpid(),
                       host=socket.gethostname())
    no_checkpoint = copy_run(base, tmp_path / "no-checkpoint")
    (no_checkpoint / "checkpoints" / "latest.pt").unlink()
    older = copy_run(base, tmp_path / "older", format_version=0)
    missing = tmp_path / "missing"
    out = tmp_path / "report"
    compare([base, missing, no_summary, running, no_checkpoint, older], out)
    md, page = read_report(out)
    left_out = md.split("## Runs left out")[1].split("##")[0]
    for path, why in ((missing, "no such run directory"), (no_summary, "no summary.json"),
                      (running, "still running (step 12"),
                      (no_checkpoint, "no checkpoint"),
                      (older, "older format (summary.json format_version 0")):
        assert f"- {path}: " in left_out and why in line_of(left_out, f"- {path}: "), path
        assert html.escape(f"{path}: ") in page
    assert "when it has finished" in line_of(left_out, f"- {running}: ")
    assert set(report_rows(out)) == {"base"} and "1 run(s) compared, 5 left out" in md


def test_the_command_line_prints_the_table_and_fails_when_nothing_can_be_compared(runs, tmp_path):
    result = run_cli("compare", runs["base"], runs["short"], tmp_path / "missing",
                     "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "top-5 accuracy" in result.stdout and "short" in result.stdout
    words = " ".join(result.stdout.split())  # rich wraps long lines wherever the path length puts them
    assert "left out" in words and "no such run directory" in words
    assert (tmp_path / "report" / "report.html").is_file()

    with pytest.raises(MicroArchError, match="none of the 1 run directories could be compared"):
        compare([tmp_path / "missing"], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # no report of nothing


def test_compare_of_only_missing_directories_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from micro_arch.cli import main

    with pytest.raises(SystemExit) as info:
        main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "report")])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and err.startswith("error: none of the 2 run directories could be compared")
    assert f"{tmp_path / 'a'}: no such run directory" in " ".join(out.split())
    assert not (tmp_path / "report").exists()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MicroArchError):
        compare([tmp_path / "a"])  # the default folder, runs/compare/<time>, is not created either
    assert not (tmp_path / "runs").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("changes, words", [
    ({"status": "interrupted", "steps": 12}, ["interrupted at step 12 of 30", "--resume"]),
    ({"status": "stopped", "steps": 12, "error": "CUDA out of memory"},
     ["stopped by an error at step 12 of 30", "CUDA out of memory", "--resume"]),
    ({"status": "running", "steps": 12, "pid": "dead", "host": "here"},
     ["crashed or killed", "status 'running'", "is gone", "--resume"]),
    ({"status": "running", "steps": 12, "pid": "alive", "host": "here"}, ["still running (step 12 of 30"]),
    ({"status": "running", "steps": 12, "pid": 1, "host": "elsewhere.example", "updated_at": "2020-01-01T00:00:00Z"},
     ["running or crashed", "elsewhere.example", "2020-01-01T00:00:00Z"]),
    ({"status": "running", "steps": 12, "pid": None, "host": None, "updated_at": None},
     ["running or crashed"]),
])
def test_compare_and_eval_tell_interrupted_running_and_crashed_runs_apart(runs, tmp_path, capsys, changes, words):
    from micro_arch.cli import main

    pid = {"dead": dead_pid(), "alive": os.getpid()}.get(changes.get("pid"), changes.get("pid"))
    host = socket.gethostname() if changes.get("host") == "here" else changes.get("host")
    run = copy_run(runs["base"], tmp_path / "run", **{**changes, "pid": pid, "host": host, "total_steps": 30})
    out = tmp_path / "report"
    compare([runs["short"], run], out)
    left_out = read_report(out)[0].split("## Runs left out")[1].split("##")[0]
    line = line_of(left_out, f"- {run}: ")
    for word in words:
        assert word in line, (word, line)
    assert "incomplete run (status" not in line
    capsys.readouterr()
    main(["eval", str(run), "--max-batches", "1", "--device", "cpu"])
    printed = " ".join(capsys.readouterr().out.split())
    assert words[0] in printed, printed


def test_an_unfinished_runs_resume_command_keeps_the_settings_it_was_started_with(runs, tmp_path):
    from micro_arch.report.runs import unfinished_state

    experiment = runs["short"].parents[2] / "short"
    run = run_experiment(experiment, ["train.max_steps=4", "train.eval_every=2"], runs_root=tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"status": "interrupted"}))
    command = unfinished_state(run).split("`")[1]
    assert "train.max_steps=4" in command, command
    resumed = run_cli(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "this run is complete (4 of 4 steps)" in " ".join(resumed.stdout.split()), resumed.stdout


def test_different_tokenizers_are_ranked_on_bits_per_byte(runs, tmp_path):
    out = tmp_path / "report"
    compare([runs["base"], runs["bpe"]], out)
    md, _ = read_report(out)
    assert "Overall, on bits per byte (the runs use different tokenizers)" in md
    assert "The runs use different tokenizers (bpe-400, char)" in md
    for row in ("held-out loss (full split) †", "perplexity †", "top-1 accuracy †",
                "final held-out loss (training) †"):
        assert f"| {row} |" in md
    assert "| bits per byte |" in md
    assert line_of(md, "- held-out loss:").endswith("not comparable across tokenizers; compare bits per byte")
    bpb = {k: float(v["bits_per_byte"]) for k, v in report_rows(out).items()}
    assert bpb["base"] != bpb["bpe"] and "- bits per byte:" not in md  # ranked across seeds, in Overall
    assert "Different held-out data" not in md  # the same text; data_fingerprint includes the tokenizer


def test_different_held_out_data_is_flagged_and_not_ranked(runs, tmp_path):
    other = copy_run(runs["base"], tmp_path / "other-data", data_fingerprint="0123456789abcdef0123")
    out = tmp_path / "report"
    compare([runs["base"], other], out)
    md, page = read_report(out)
    assert "Different held-out data" in md and "0123456789abcdef0123" in md
    assert "Different held-out data" in page
    assert "| bits per byte ‡ |" in md
    assert line_of(md, "- bits per byte:").endswith("evaluated on different held-out data")
    assert "**" not in line_of(md, "| held-out loss (full split) ‡ |")


def test_two_copies_of_one_run_are_within_noise(runs, tmp_path):
    copy = copy_run(runs["base"], tmp_path / "copy")
    out = tmp_path / "report"
    compare([runs["base"], copy], out)
    md, _ = read_report(out)
    assert "the runs differ only in seed, so they are one arm" in line_of(md, "- Overall")
    assert "**" not in line_of(md, "| held-out loss (full split) |")


def test_fresh_samples_use_the_same_prompt_and_seed_for_every_run(runs, tmp_path):
    from micro_arch.eval.generate import sample_from_run

    out = tmp_path / "report"
    compare([runs["base"], runs["short"]], out, prompts=["KING:"])
    md, _ = read_report(out)
    assert "### Prompt `'KING:'`" in md and "'ROMEO:'" not in md
    cells = line_of(md.split("### Prompt `'KING:'`")[1].split("\n", 3)[3], "| ").split(" | ")
    for cell, name in zip(cells, ("base", "short")):
        (text,) = sample_from_run(runs[name], ["KING:"], seed=0, device="cpu")
        assert cell.strip("| ") == html.escape("KING:" + text).replace("\n", "<br>").strip()


# --- the rules, on synthetic numbers ------------------------------------------------------------


def test_standard_error_of_batch_losses():
    assert standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    assert standard_error([2.0]) is None


def test_rank_names_the_lower_or_higher_value_only_beyond_the_noise():
    se = {"a": 0.01, "b": 0.01, "c": 0.01}
    assert rank("loss", {"a": 1.0, "b": 1.5, "c": 1.2}, se).best == "a"
    assert rank("loss", {"a": 1.5, "b": 1.0}, se).best == "b"
    assert rank("accuracy", {"a": 0.5, "b": 0.6}, se, lower_is_better=False).best == "b"
    # noise of the difference: 2 * sqrt(0.01^2 + 0.01^2) = 0.0283
    close = rank("loss", {"a": 1.0, "b": 1.02, "c": 1.2}, se)
    assert close.best is None and close.tied == ["a", "b"] and "within noise" in close.text
    assert rank("loss", {"a": 1.0, "b": 1.03}, se).best == "a"
    assert rank("loss", {"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0}).best is None  # equal, even without noise


def test_rank_without_a_noise_estimate():
    assert rank("memory", {"a": 10.0, "b": 10.5}, None).best == "a"
    equal = rank("memory", {"a": 10.0, "b": 10.0}, None)
    assert equal.best is None and "equal" in equal.text
    unknown = rank("loss", {"a": 1.0, "b": 1.001}, {"a": None, "b": 0.1})
    assert unknown.best == "a" and "noise unknown" in unknown.text
    assert rank("loss", {"a": 1.0, "b": None}, None).best is None


def test_assess_compares_tokenizers_held_out_data_and_hardware():
    run = {"tokenizer": "char", "data_fingerprint": "f1", "corpus_key": "k", "device": "cpu", "world_size": 1}
    same = assess({"a": run, "b": dict(run)})
    assert same.one_tokenizer and same.same_held_out and same.one_hardware and same.headline == "eval_loss"
    assert not same.notes
    bpe = assess({"a": run, "b": run | {"tokenizer": "bpe-320", "data_fingerprint": "f2"}})
    assert not bpe.one_tokenizer and bpe.same_held_out and bpe.headline == "bits_per_byte"
    other_text = assess({"a": run, "b": run | {"tokenizer": "bpe-320", "data_fingerprint": "f2",
                                               "corpus_key": "j"}})
    assert not other_text.same_held_out
    other_data = assess({"a": run, "b": run | {"data_fingerprint": "f2"}, "c": dict(run)})
    assert other_data.held_out_groups == [["a", "c"], ["b"]]
    assert "not comparable" in other_data.notes[0]
    gpu = assess({"a": run, "b": run | {"device": "cuda:0"}})
    assert not gpu.one_hardware and gpu.same_held_out


def test_throughput_is_not_ranked_when_a_run_trained_on_a_busy_machine():
    """Load average above the CPUs plus the run's own share: another job shared the machine, so the runs'
    tokens/s say more about it than about the models. Peak memory is still compared."""
    import pandas as pd

    from micro_arch.report.fairness import verdicts

    run = {"tokenizer": "char", "data_fingerprint": "f1", "device": "cpu", "world_size": 1, "cpu_count": 2}
    table = pd.DataFrame({"tokens_per_sec": [3736.0, 1062.0], "peak_memory_mb": [500.0, 600.0]}, index=["a", "b"])
    quiet = assess({"a": run | {"load_average": 2.1}, "b": run | {"load_average": 1.9}})
    assert not quiet.busy and not quiet.notes
    assert [v.best for v in verdicts(table, quiet)] == ["a", "a"]
    busy = assess({"a": run | {"load_average": 2.1}, "b": run | {"load_average": 5.6}})
    assert busy.busy == ["b"] and "b 5.6 on 2 CPUs" in busy.notes[0]
    throughput, memory = verdicts(table, busy)
    assert throughput.best is None and "b ran on a busy machine" in throughput.text
    assert memory.best == "a"
    old = assess({"a": run, "b": dict(run)})  # runs from before load_average was recorded: ranked as before
    assert not old.busy


def test_the_report_follows_each_run_back_to_where_it_started(runs, tmp_path):
    from micro_arch.hf.init import PARENT_FILE, read_source

    child = copy_run(runs["base"], tmp_path / "child")
    grandchild = copy_run(runs["base"], tmp_path / "grandchild")
    for run, parent in ((child, runs["base"]), (grandchild, child)):
        provenance = read_source(str(parent))[2]  # what a run started with model.init_from records
        (run / PARENT_FILE).write_text(json.dumps(provenance))
    step = json.loads((runs["base"] / "summary.json").read_text())["steps"]
    name = json.loads((runs["base"] / "summary.json").read_text())["experiment"]
    out = tmp_path / "report"
    compare([runs["base"], grandchild], out)
    row = line_of(read_report(out)[0], "| started from |")
    assert "| scratch |" in row
    assert f"{name}/child step {step} <- {name}/{runs['base'].name} step {step}" in row

    shutil.rmtree(child)  # a parent that was deleted ends the chain where it is still known
    compare([grandchild], tmp_path / "report2")
    assert f"| {name}/child step {step} |" in line_of(read_report(tmp_path / "report2")[0], "| started from |")
