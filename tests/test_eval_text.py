"""Perplexity on any text: eval --data and compare --data, and what a tokenizer cannot encode."""

import json

import pytest
from stage_helpers import (
    TEXT,
    make_run,
)


def test_eval_on_any_text_counts_what_the_tokenizer_cannot_encode(tmp_path):
    from helpers import run_cli

    from micro_arch.eval.evaluate import evaluate
    from micro_arch.eval.text import evaluate_on_data

    run, model, base = make_run(tmp_path / "run")
    text = "Où est la gare? Wie schön!\n\nNo accents here, friend."
    (tmp_path / "other.txt").write_text(text)
    result = evaluate_on_data(run, str(tmp_path / "other.txt"), device="cpu")
    outside = [c for c in text if c not in TEXT]
    assert result["unencodable"] == len(outside) == 2 and result["characters"] == len(text) - 2  # minus "\n\n"
    assert sorted(c for c, _ in result["unencodable_top"]) == sorted(set(outside))
    kept = "".join(c for c in text if c in TEXT)
    expected = evaluate(model.eval(), base.encode_array(kept), 32, 32, "cpu", tokenizer=base)
    assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert result["n_bytes"] == len(kept.encode()) - 1  # every byte but the first is predicted
    out = run_cli("eval", run, "--data", tmp_path / "other.txt", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "2 of 50 characters (4.00%) cannot be encoded" in out.stdout.replace("\n", " ")


def test_eval_and_compare_data_take_a_text_field(tmp_path):
    """A .jsonl whose text is not in 'text': the error names the option that fixes it (eval and compare take
    no --set), and --text-field gives the same numbers as the same text in a .txt file."""
    from helpers import run_cli

    run, _, _ = make_run(tmp_path / "run")
    docs = ["the quick brown fox.", "jumps over the lazy dog."]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    for command in ("eval", "compare"):
        out = run_cli(command, run, "--data", tmp_path / "a.jsonl", *(["--device", "cpu"] if command == "eval" else []))
        assert out.returncode == 2 and "no column 'text' (columns: body); set --text-field" in out.stderr, out.stderr
    as_txt = run_cli("eval", run, "--data", tmp_path / "a.txt", "--device", "cpu")
    as_jsonl = run_cli("eval", run, "--data", tmp_path / "a.jsonl", "--text-field", "body", "--device", "cpu")
    assert as_jsonl.returncode == 0, as_jsonl.stderr
    table = [line for line in as_jsonl.stdout.splitlines() if "bits" in line or "loss" in line]
    assert table and table == [line for line in as_txt.stdout.splitlines() if "bits" in line or "loss" in line]
    ranked = run_cli("compare", run, "--data", tmp_path / "a.jsonl", "--text-field", "body")
    assert ranked.returncode == 0, ranked.stderr


def test_compare_on_data_ranks_runs_in_bits_per_byte(tmp_path):
    from micro_arch.eval.text import compare_on_data, evaluate_on_data

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 8)
    runs = [str(make_run(tmp_path / f"run{i}", seed=i)[0]) for i in range(3)]
    rows = compare_on_data(runs, str(tmp_path / "a.txt"), out=tmp_path / "report")
    each = {r: evaluate_on_data(r, str(tmp_path / "a.txt"))["bits_per_byte"] for r in runs}
    assert [r["run"] for r in rows] == sorted(runs, key=each.get)
    assert [r["bits_per_byte"] for r in rows] == pytest.approx(sorted(each.values()))
    assert (tmp_path / "report/data_ranking.md").read_text().count("| ") > 10
