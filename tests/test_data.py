"""The data package: the built-in split, sources, tokenizers, the token cache, batches and bad input."""

import json

import numpy as np
import pytest
import torch

from micro_arch.config import DataConfig, SourceConfig
from micro_arch.data import (
    SEPARATOR,
    CharTokenizer,
    eval_batches,
    iter_eval_windows,
    load_tokenizer,
    prepare_data,
    sample_batch,
)
from micro_arch.data import prepare as prepare_module
from micro_arch.data.corpus import read_works, split_works
from micro_arch.errors import MicroArchError
from micro_arch.eval.text import source_documents


@pytest.fixture(scope="module")
def works():
    return read_works()


def prose(works, n_chars=60_000):
    """Real English for small tokenizer tests: the start of the first works."""
    return "".join(text for _, text in works[:2])[:n_chars]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def docs(prefix, n):
    return [f"{prefix} document {i}: " + " ".join(f"w{i * j % 97}" for j in range(30)) for i in range(n)]


# --- the built-in corpus -----------------------------------------------------------------------


def test_default_split_holds_out_whole_works_after_ninety_percent(works):
    assert len(works) == 42 and [n for n, _ in works] == sorted(n for n, _ in works)
    train, held_out = split_works(works)
    assert train + held_out == works and held_out
    total = sum(len(t) for _, t in works)
    before_last_train = sum(len(t) for _, t in train[:-1])
    assert before_last_train < 0.9 * total <= before_last_train + len(train[-1][1])
    held_chars = sum(len(t) for _, t in held_out)
    assert 360_000 < held_chars < 380_000
    train_text = SEPARATOR.join(t for _, t in train)
    for _, text in held_out:  # no held-out passage appears in training
        for start in range(1000, len(text) - 200, len(text) // 5):
            assert text[start:start + 200] not in train_text


def test_shakespeare_char_data_matches_the_split(cache, works):
    data = prepare_data(DataConfig())
    _, held_out = split_works(works)
    val_text = SEPARATOR.join(t for _, t in held_out)
    assert data.tokenizer.name == "char" and data.train.dtype == np.uint16
    assert data.tokenizer.decode(data.val) == val_text
    assert data.val_bytes == len(val_text.encode("utf-8"))
    assert len(data.train) + len(data.val) == sum(len(t) for _, t in works) + len(SEPARATOR) * 40


# --- tokenizers --------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_and_refuses_unknown_characters(tmp_path):
    text = "To be, or not to be: Ünïcödé ✓ 𝄞\n\n"
    tok = CharTokenizer.from_texts([text])
    ids = tok.encode(text)
    assert tok.vocab_size == len(set(text)) and sorted(ids) == sorted(sorted(set(text)).index(c) for c in text)
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="Z"):
        tok.encode("Zed")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.name == "char" and again.encode(text) == ids


def test_char_ids_of_bytes_and_code_points_match_a_dictionary_lookup():
    text = "To be, or not to be: Ünïcödé ✓ 𝄞\n\n\tand the rest" * 3
    tok = CharTokenizer.from_texts([text])
    expected = [tok.chars.index(c) for c in text]
    ascii_part = "To be, or not to be:\n\t"
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    for dtype in (np.uint16, np.uint32, np.int32):
        assert tok.ids_of(codes, dtype).tolist() == expected and tok.ids_of(codes, dtype).dtype == dtype
        assert tok.ids_of(ascii_part.encode(), dtype).tolist() == [tok.chars.index(c) for c in ascii_part]
        out = np.full(len(ascii_part) + 2, 7, dtype=dtype)
        tok.ids_of(ascii_part.encode(), dtype, out=out[1:-1])
        assert out[1:-1].tolist() == [tok.chars.index(c) for c in ascii_part] and out[0] == out[-1] == 7
        with pytest.raises(ValueError, match="'Z'"):
            tok.ids_of(b"to Zed", dtype)  # ASCII bytes: translated byte for byte
        with pytest.raises(ValueError, match="'Zж'"):
            tok.ids_of(np.frombuffer("to Zed ж".encode("utf-32-le"), dtype=np.uint32), dtype)
    assert tok.encode_array(text, np.uint16).tolist() == expected == tok.encode(text)


TRAIN_IN_A_PROCESS = """
import hashlib, os, sys
import numpy as np
from micro_arch.data import tokenizers
if sys.argv[1] == "one-core":  # as on a machine of one core
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.cpu_count = lambda: 1
rng = np.random.default_rng(0)
words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(3000)]
p = 1 / np.arange(1, 3001)
texts = ["\\n".join(" ".join(rng.choice(words, size=8, p=p / p.sum())) for _ in range(400)) for _ in range(10)]
tokenizers.SENTENCES = 300
print(hashlib.sha256(tokenizers.train_bpe(texts, 600)).hexdigest())
"""


def test_bpe_from_one_corpus_is_one_tokenizer_in_any_process_on_any_cores():
    """SentencePiece's own line sample differs from process to process, and its model depends on its number of
    threads: the sample is ours (seeded) and the threads fixed, so two machines train the same tokenizer."""
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", TRAIN_IN_A_PROCESS, how], capture_output=True, text=True,
                              check=True).stdout for how in ("all-cores", "all-cores", "one-core")}
    assert len(digests) == 1, digests


def test_training_lines_are_every_line_or_a_fixed_sample(monkeypatch):
    from micro_arch.data import tokenizers

    texts = ["a\nb\n\n  \nc", "d\ne", "f"]
    assert list(tokenizers.training_lines(texts)) == ["a", "b", "c", "d", "e", "f"]
    monkeypatch.setattr(tokenizers, "SENTENCES", 4)
    sample = list(tokenizers.training_lines(texts))
    assert len(sample) == 4 and sample == sorted(sample) and sample == list(tokenizers.training_lines(texts))


def test_bpe_trains_once_round_trips_and_loads_from_a_model_path(cache, tmp_path, works, monkeypatch):
    (tmp_path / "corpus.txt").write_text(prose(works))
    trained = []
    real_train = prepare_module.train_bpe
    monkeypatch.setattr(prepare_module, "train_bpe", lambda *a: trained.append(a) or real_train(*a))
    cfg = DataConfig(source=str(tmp_path / "corpus.txt"), tokenizer="bpe", vocab_size=400)
    data = prepare_data(cfg)
    again = prepare_data(cfg)
    assert len(trained) == 1
    tok = data.tokenizer
    assert tok.name == "bpe-400" and tok.vocab_size == 400 and again.fingerprint == data.fingerprint
    text = "  KING LEAR.\nWhat, ho!\tÜnseen ✓ 𝄞 42\n\n"  # characters the corpus lacks: byte fallback
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.decode(data.val).encode("utf-8")) == data.val_bytes
    assert len(data.train) < 0.8 * len(tok.decode(data.train))  # merged pieces are longer than a character

    run_dir = tmp_path / "run"
    tok.save(run_dir)
    loaded = load_tokenizer(run_dir)
    assert loaded.name == "bpe-400" and loaded.encode(text) == tok.encode(text)

    (model,) = (cache / "tokenizers").glob("bpe-400-*.model")
    by_path = prepare_data(DataConfig(source=cfg.source, tokenizer=str(model)))
    assert by_path.tokenizer.vocab_size == 400 and by_path.tokenizer.name.startswith("sentencepiece")
    assert np.array_equal(by_path.val, data.val) and by_path.fingerprint == data.fingerprint


# --- sources -----------------------------------------------------------------------------------


def test_jsonl_holds_out_the_last_documents(cache, tmp_path):
    texts = docs("json", 20)
    data = prepare_data(DataConfig(source=str(write_jsonl(tmp_path / "d.jsonl", texts)), val_fraction=0.1))
    decode = data.tokenizer.decode
    assert decode(data.train) == SEPARATOR.join(texts[:18])
    assert decode(data.val) == SEPARATOR.join(texts[18:])


def test_jsonl_rows_whose_text_is_not_text_are_counted_and_said(cache, tmp_path, capsys):
    """Issue 25: a number or null (or no field at all) where the text should be was dropped without a word."""
    texts = docs("json", 10)
    rows = [{"text": t} for t in texts[:4]] + [{"text": 5}, {"text": None}, {"title": "no text"}, {"text": 2.5}] + \
        [{"text": t} for t in texts[4:]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_data(DataConfig(source=str(path), val_fraction=0.1))
    assert data.tokenizer.decode(data.train) + SEPARATOR + data.tokenizer.decode(data.val) == SEPARATOR.join(texts)
    err = capsys.readouterr().err
    assert f"warning: {path}: 4 of 14 rows have a 'text' that is not text" in err, err


def test_a_file_of_a_kind_not_read_says_which_kind(tmp_path):
    from micro_arch.data.sources import resolve_source

    (tmp_path / "README.md").write_text("# a title\n\nsome text\n")
    with pytest.raises(MicroArchError) as info:
        resolve_source(str(tmp_path / "README.md"), "text", tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'README.md'}: micro-arch does not read '.md' files; it reads .txt")
    assert "one kind" not in message and "copy or link it to a name ending in .txt" in message


def test_parquet_with_another_text_field(cache, tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = docs("parquet", 10)
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(tmp_path / "d.parquet"))
    data = prepare_data(DataConfig(source=str(tmp_path / "d.parquet"), text_field="body", val_fraction=0.2))
    assert data.tokenizer.decode(data.val) == SEPARATOR.join(texts[8:])
    with pytest.raises(MicroArchError, match="no column 'text'.*body"):
        prepare_data(DataConfig(source=str(tmp_path / "d.parquet")))


def test_txt_glob_reads_paragraphs_of_every_file_in_order(cache, tmp_path):
    first, second = docs("alpha", 6), docs("beta", 4)
    (tmp_path / "a.txt").write_text(SEPARATOR.join(first) + "\n")
    (tmp_path / "b.txt").write_text(SEPARATOR.join(second) + "\n")
    (tmp_path / "notes.md").write_text("not matched")
    data = prepare_data(DataConfig(source=str(tmp_path / "*.txt"), val_fraction=0.2))
    decode = data.tokenizer.decode
    assert decode(data.val) == SEPARATOR.join(second[2:]) + "\n"  # the file's own last newline
    assert decode(data.train).replace("\n", "") == "".join(first + second[:2])


def test_mixture_follows_the_weights(cache, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["a" * (50 + i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", ["b" * (50 + i) for i in range(40)])
    mixed = DataConfig(source=[SourceConfig(str(a), weight=3.0), SourceConfig(str(b), weight=1.0)])
    data = prepare_data(mixed)
    text = data.tokenizer.decode(data.train)
    assert text.count("a") / text.count("b") == pytest.approx(3.0, rel=0.05)
    assert len(text.replace("\n", "")) == pytest.approx(2 * sum(50 + i for i in range(36)), rel=0.05)
    assert data.tokenizer.decode(data.val) == SEPARATOR.join(["a" * n for n in range(86, 90)] + ["b" * n for n in range(86, 90)])
    assert np.array_equal(prepare_data(mixed).train, data.train)  # deterministic
    other = DataConfig(source=[SourceConfig(str(a), weight=1.0), SourceConfig(str(b), weight=1.0)])
    assert prepare_data(other).fingerprint != data.fingerprint


# --- the token cache ---------------------------------------------------------------------------


def test_second_prepare_reuses_the_cache_and_a_changed_file_does_not(cache, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", docs("cached", 10))
    encoded = []
    real_encode = prepare_module.encode_source
    monkeypatch.setattr(prepare_module, "encode_source", lambda *a: encoded.append(1) or real_encode(*a))
    first = prepare_data(DataConfig(source=str(path)))
    second = prepare_data(DataConfig(source=str(path)))
    assert len(encoded) == 1 and isinstance(second.train, np.memmap)
    assert second.train.filename == first.train.filename and np.array_equal(second.val, first.val)
    assert second.fingerprint == first.fingerprint and second.val_bytes == first.val_bytes
    assert not list(cache.glob("tokens/.*"))  # no temporary folders left behind

    write_jsonl(path, docs("changed", 12))
    third = prepare_data(DataConfig(source=str(path)))
    assert len(encoded) == 2 and third.fingerprint != first.fingerprint
    elsewhere = prepare_data(DataConfig(source=str(path), cache_dir=str(tmp_path / "elsewhere")))
    assert str(elsewhere.train.filename).startswith(str(tmp_path / "elsewhere"))


# --- batches -----------------------------------------------------------------------------------


def test_sample_batch_is_deterministic_shifted_and_split_across_ranks():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = sample_batch(tokens, 4, 16, seed=1, step=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one (tokens are consecutive integers)
    assert torch.equal(sample_batch(tokens, 4, 16, seed=1, step=3)[0], x)
    assert not torch.equal(sample_batch(tokens, 4, 16, seed=1, step=4)[0], x)
    assert not torch.equal(sample_batch(tokens, 4, 16, seed=2, step=3)[0], x)
    whole = sample_batch(tokens, 8, 16, seed=1, step=3)
    ranks = [sample_batch(tokens, 4, 16, seed=1, step=3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([r[0] for r in ranks]), whole[0])
    assert torch.equal(torch.cat([r[1] for r in ranks]), whole[1])


def test_ids_above_the_signed_range_survive_the_gather():
    for dtype in (np.uint16, np.uint32):
        top = np.iinfo(dtype).max
        tokens = np.arange(top - 99, top + 1, dtype=np.int64).astype(dtype)
        x, y = sample_batch(tokens, 2, 8, seed=0, step=0)
        assert int(x.min()) >= top - 99 and int(y.max()) <= top and torch.equal(y, x + 1)


def test_eval_windows_are_fixed_and_cover_the_split():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = eval_batches(tokens, 4, 32, n_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 32) for x, _ in batches)
    assert int(batches[0][0][0, 0]) == 0 and int(batches[-1][1][-1, -1]) == 999
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, eval_batches(tokens, 4, 32, n_batches=3)))

    windows = list(iter_eval_windows(tokens, 4, 32))
    targets = torch.cat([y.reshape(-1) for _, y in windows])
    assert torch.equal(targets[targets != -1], torch.arange(1, 1000))
    assert all(torch.equal(y[x != 0][:-1], x[x != 0][1:]) for x, y in windows[:1])
    assert len(list(iter_eval_windows(tokens, 4, 32, max_batches=2))) == 2


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("{tmp}/missing.txt", "missing.txt: no such file"),
    ("{tmp}/none-*.jsonl", r"none-\*.jsonl: the glob matches no files"),
    ("{tmp}/empty.jsonl", "empty.jsonl: the corpus is empty"),
    ("{tmp}/one.txt", "one.txt: only 1 document"),
])
def test_bad_sources_name_the_file_and_the_fix(cache, tmp_path, source, message):
    write_jsonl(tmp_path / "empty.json", ["", ""]).rename(tmp_path / "empty.jsonl")
    (tmp_path / "one.txt").write_text("a single paragraph\nof two lines\n")
    with pytest.raises(MicroArchError, match=message):
        prepare_data(DataConfig(source=source.format(tmp=tmp_path)))


def test_too_large_a_vocabulary_names_the_size_and_the_fix(cache, tmp_path, works):
    (tmp_path / "small.txt").write_text(prose(works, 20_000))
    with pytest.raises(MicroArchError, match="vocab_size=50000 is larger than this corpus supports.*lower"):
        prepare_data(DataConfig(source=str(tmp_path / "small.txt"), tokenizer="bpe", vocab_size=50_000))


def test_seq_len_longer_than_the_held_out_split():
    with pytest.raises(MicroArchError, match="seq_len=64 is longer than the held-out split"):
        eval_batches(np.arange(50, dtype=np.uint16), 2, 64, 1)


def test_unknown_tokenizer_and_unreachable_hub(cache, monkeypatch):
    with pytest.raises(MicroArchError, match="did you mean: bpe"):
        prepare_data(DataConfig(tokenizer="bpee"))
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # any connection failure, without waiting
    with pytest.raises(MicroArchError, match="could not reach the Hugging Face hub.*local files"):
        prepare_data(DataConfig(source="someone/some-dataset"))


@pytest.mark.parametrize("name, content, words", [
    ("empty.txt", b"", ["empty.txt: the file is empty", "put text in it"]),
    ("blank.txt", b"\n  \n\t\n", ["blank.txt: the file is empty", "whitespace"]),
    ("latin1.txt", "caf\xe9 au lait\n\nsecond".encode("latin-1"), ["not UTF-8 text", "byte 3 (0xe9)", "iconv"]),
    ("binary.txt", b"hello\n\n\x00\x01\x02\xff", ["not UTF-8 text", "byte 7", "NUL"]),
    ("cut.txt", "ab\n\ncd é".encode()[:-1], ["not UTF-8 text", "byte 7 (0xc3)"]),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', ["bad.jsonl", "not UTF-8 text", "byte 25 (0xff)"]),
])
def test_empty_and_non_utf8_files_say_which_and_what_to_do(cache, tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MicroArchError) as info:
        prepare_data(DataConfig(source=str(tmp_path / name)))
    message = str(info.value)
    assert "DatasetGenerationError" not in message and len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)
    with pytest.raises(MicroArchError) as info:  # the same file given to `eval --data` / `compare --data`
        source_documents(str(tmp_path / name))
    message = str(info.value)
    assert "leave it out of --data" in message, message
    for word in words:
        assert word in message, (word, message)


def test_the_bad_file_of_a_glob_is_named(cache, tmp_path, works):
    (tmp_path / "a.txt").write_text(prose(works, 5_000))
    (tmp_path / "b.txt").write_bytes(b"\xfe\xff")
    with pytest.raises(MicroArchError, match=r"b\.txt: not UTF-8 text: byte 0"):
        prepare_data(DataConfig(source=str(tmp_path / "*.txt")))


def test_unreachable_hub_fails_fast_in_one_line_without_retries(cache, monkeypatch, capfd, caplog):
    pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(MicroArchError) as info:
        prepare_data(DataConfig(source="someone/made-up-corpus-name"))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "could not reach the Hugging Face hub" in message and "127.0.0.1:9" in message
    assert "local files" in message
    out, err = capfd.readouterr()
    assert "Retry" not in out + err + caplog.text


@pytest.mark.parametrize("content, words", [
    (b'{"text": "ok"}\n{"text": broken}\n', ["bad.jsonl:2: not valid JSON", "column 10", "one JSON object"]),
    (b'{"text": "ok"}\n\n["a list"]\n', ["bad.jsonl:3: a JSON list, not an object"]),
])
def test_a_bad_jsonl_line_is_named_without_log_noise(cache, tmp_path, capfd, content, words):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(MicroArchError) as info:
        prepare_data(DataConfig(source=str(tmp_path / "bad.jsonl")))
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    out, err = capfd.readouterr()
    assert "Failed to" not in out + err
