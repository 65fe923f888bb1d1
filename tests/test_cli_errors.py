"""Bad command-line arguments: one line naming the argument and what it must be, exit status 2, before any work."""

import os

import pytest
from helpers import ROOT

from micro_arch.cli import main

EXPERIMENT = ROOT / "experiments" / "shakespeare-char"


def cli(capsys, *args):
    """Run `micro-arch ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *words):
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


BAD_NUMBERS = [
    (["eval", "RUN", "--batch-size", "0"], ["--batch-size", "at least 1, got 0"]),
    (["eval", "RUN", "--max-batches", "0"], ["--max-batches", "at least 1, got 0"]),
    (["eval", "RUN", "--batch-size", "big"], ["--batch-size", "whole number", "'big'"]),
    (["generate", "RUN", "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
    (["generate", "RUN", "--num-samples", "0"], ["--num-samples", "at least 1"]),
    (["generate", "RUN", "--top-k", "0"], ["--top-k", "at least 1"]),
    (["generate", "RUN", "--temperature", "-0.5"], ["--temperature", "at least 0"]),
    (["generate", "RUN", "--temperature", "nan"], ["--temperature", "at least 0"]),
    (["generate", "RUN", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["generate", "RUN", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["chat", "RUN", "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
    (["chat", "RUN", "--temperature", "-1"], ["--temperature", "at least 0"]),
    (["chat", "RUN", "--top-p", "2"], ["--top-p", "(0, 1]"]),
    (["trace", EXPERIMENT, "--batch", "0"], ["--batch", "at least 1"]),
    (["trace", EXPERIMENT, "--seq-len", "-1"], ["--seq-len", "at least 1"]),
    (["trace", EXPERIMENT, "--depth", "-1"], ["--depth", "at least 0"]),
    (["sweep", "sweeps/tiny.yaml", "--trials", "0"], ["--trials", "at least 1"]),
    (["sweep", "sweeps/tiny.yaml", "--workers", "0"], ["--workers", "at least 1"]),
    (["sweep", "sweeps/tiny.yaml", "--nnodes", "0"], ["--nnodes", "at least 1"]),
    (["run", EXPERIMENT, "--nproc", "0"], ["--nproc", "at least 1"]),
]


@pytest.mark.parametrize("args,words", BAD_NUMBERS, ids=[" ".join(map(str, a[0][:1] + a[0][2:])) for a in BAD_NUMBERS])
def test_bad_numbers_are_refused_while_parsing(capsys, args, words):
    code, out, err = cli(capsys, *args)
    assert_one_line_error(code, out, err, *words)
    assert out == ""  # nothing ran


def test_sweep_nnodes_without_a_rendezvous_endpoint_is_refused(capsys):
    code, out, err = cli(capsys, "sweep", "sweeps/tiny.yaml", "--nnodes", "2")
    assert_one_line_error(code, out, err, "--nnodes and --rdzv-endpoint go together")


def test_trace_out_in_a_missing_folder_is_refused_before_tracing(capsys, tmp_path):
    target = tmp_path / "missing" / "t.txt"
    code, out, err = cli(capsys, "trace", EXPERIMENT, "--out", target)
    assert_one_line_error(code, out, err, "--out", "does not exist", str(tmp_path / "missing"))
    assert out == "" and not (tmp_path / "missing").exists()


def test_trace_out_under_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = cli(capsys, "trace", EXPERIMENT, "--out", tmp_path / "file" / "t.txt")
    assert_one_line_error(code, out, err, "--out", "is a file, not a folder")


def test_trace_out_that_is_a_folder_is_refused(capsys, tmp_path):
    code, out, err = cli(capsys, "trace", EXPERIMENT, "--out", tmp_path)
    assert_one_line_error(code, out, err, "--out", "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_trace_out_in_a_read_only_folder_is_refused(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, out, err = cli(capsys, "trace", EXPERIMENT, "--out", locked / "t.txt")
    finally:
        locked.chmod(0o700)
    assert_one_line_error(code, out, err, "--out", "not writable")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("args", [
    ["trace", EXPERIMENT, "--out", "/proc/trace.txt"],  # was a FileNotFoundError traceback after tracing
    ["compare", "RUN", "--out", "/proc/report"],
    ["run", EXPERIMENT, "--runs-dir", "/proc/runs"],
    ["export", "RUN", "--out", "/proc/hf"],
])
def test_an_output_path_where_no_file_can_be_made_is_refused_before_any_work(capsys, args):
    """os.access says /proc is writable to root; creating a file there is what tells."""
    code, out, err = cli(capsys, *args)
    assert_one_line_error(code, out, err, "'/proc'", "not writable")
    assert out == ""


def test_an_empty_chat_prompt_is_refused(capsys):
    code, out, err = cli(capsys, "chat", "RUN", "--prompt", "Who goes there?", "--prompt", " ")
    assert_one_line_error(code, out, err, "--prompt ' ' (the 2nd of 2) is empty", "needs text")
    assert out == ""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_device_option_the_machine_lacks_names_the_option(capsys, command):
    code, out, err = cli(capsys, command, "RUN", "--device", "cuda")
    assert_one_line_error(code, out, err, "--device cuda but no CUDA GPU is visible; use --device cpu")
    assert "train.device" not in err


def test_trace_out_writes_the_tree(capsys, tmp_path):
    target = tmp_path / "t.txt"
    code, out, err = cli(capsys, "trace", EXPERIMENT, "--depth", "1", "--batch", "1", "--seq-len", "8",
                         "--out", target)
    assert code == 0, err
    assert "(1, 8)" in target.read_text() and "written to" in out


def test_trace_seq_len_beyond_the_model_is_refused(capsys):
    code, out, err = cli(capsys, "trace", EXPERIMENT, "--seq-len", "100000")
    assert_one_line_error(code, out, err, "--seq-len 100000", "model.max_seq_len")


def test_compare_out_with_a_missing_parent_is_refused_before_reading_runs(capsys, tmp_path):
    code, out, err = cli(capsys, "compare", tmp_path / "no-run", "--out", tmp_path / "a" / "b")
    assert_one_line_error(code, out, err, "--out", "does not exist")
    assert not (tmp_path / "a").exists()


def test_argparse_errors_are_one_line_too(capsys):
    code, out, err = cli(capsys, "eval")
    assert_one_line_error(code, out, err, "run_dir", "micro-arch eval --help")


def test_run_runs_dir_in_a_missing_folder_is_refused_before_any_folder_is_made(capsys, tmp_path):
    target = tmp_path / "typo" / "runs"
    code, out, err = cli(capsys, "run", EXPERIMENT, "--runs-dir", target)
    assert_one_line_error(code, out, err, "--runs-dir", "does not exist")
    assert not (tmp_path / "typo").exists()


def test_a_run_whose_config_is_broken_yaml_says_where(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  d_model: [64\n")
    code, out, err = cli(capsys, "eval", run)
    assert code == 2 and "Traceback" not in err, err
    assert f"{run / 'config.yaml'}:" in err and "line 2" in err and "not valid YAML" in err, err
