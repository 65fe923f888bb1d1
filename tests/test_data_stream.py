"""Streaming preparation (issue 21): shards equal the whole-file path, resume after a kill, several workers,
windows across shards, DDP ranks, mixtures by token share, bounded tokenizer samples, bad input."""

import json
import os

import numpy as np
import pytest
import torch

from micro_arch.config import DataConfig, SourceConfig
from micro_arch.data import SEPARATOR, prepare_data, sample_batch
from micro_arch.data import prepare as prepare_module
from micro_arch.data import stream as stream_module
from micro_arch.data.batches import eval_batches, iter_eval_windows
from micro_arch.data.corpus import read_works
from micro_arch.data.documents import plan, read
from micro_arch.data.shards import ShardWriter, TokenStream
from micro_arch.data.sources import hold_out, resolve_source
from micro_arch.errors import MicroArchError


@pytest.fixture(scope="module")
def prose():
    """Real English: the start of the first works, about 60 KB."""
    return "".join(text for _, text in read_works()[:2])[:60_000]


def paragraphs(prose, n, offset=0):
    parts = [p for p in prose.split("\n\n") if p.strip()]
    return [parts[(offset + i) % len(parts)] for i in range(n)]


def write_corpus(folder, prose):
    """The three formats, with what a reader can trip on: runs of blank lines, CRLF, empty records."""
    folder.mkdir()
    text = "\n\n".join(paragraphs(prose, 120))
    text = text.replace("\n\n", "\n\n\n", 7).replace("\n\n", "\r\n\r\n", 5) + "\n\n\n\n"
    (folder / "a.txt").write_text(text, newline="")
    rows = [{"text": t, "n": i} for i, t in enumerate(paragraphs(prose, 80, 120))]
    rows[3]["text"], rows[5]["text"] = "", None
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 9 else "") for i, r in enumerate(rows)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": paragraphs(prose, 90, 200)}), folder / "c.parquet", row_group_size=17)
    return folder


def reference(source, field, val_fraction, tokenizer):
    """The whole-file path: every document read with `datasets`, the last documents held out, encoded one by
    one and joined with the separator's ids."""
    import tempfile
    from pathlib import Path

    src = resolve_source(source, field, Path(tempfile.mkdtemp()))
    train, val = hold_out(src.documents(), val_fraction, source)
    sep = tokenizer.encode(SEPARATOR)

    def join(docs):
        out = []
        for i, d in enumerate(docs):
            out += (sep if i else []) + tokenizer.encode(d)
        return np.asarray(out)

    return join(train), join(val), len(SEPARATOR.join(val).encode())


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
@pytest.mark.parametrize("name", ["a.txt", "b.jsonl", "c.parquet"])
def test_streamed_shards_equal_the_whole_file_tokens(cache, tmp_path, prose, monkeypatch, name, tokenizer):
    folder = write_corpus(tmp_path / "corpus", prose)
    source = str(folder / name)
    monkeypatch.setattr(prepare_module, "settings", lambda cfg, total: stream_module.Settings(1, 3000, 2500))
    data = prepare_data(DataConfig(source=source, tokenizer=tokenizer, vocab_size=400, val_fraction=0.15))
    if tokenizer == "bpe":  # trained on every training document, as before: the sample bound is far above
        docs = reference_docs(source)
        assert data.tokenizer.model_proto == prepare_module.train_bpe(hold_out(docs, 0.15, source)[0], 400)
    train, val, val_bytes = reference(source, "text", 0.15, data.tokenizer)
    assert isinstance(data.train, TokenStream) and len(data.train.parts) > 2  # several shards of 2500
    assert np.array_equal(np.asarray(data.train), train) and np.array_equal(np.asarray(data.val), val)
    assert data.val_bytes == val_bytes


def reference_docs(source):
    import tempfile
    from pathlib import Path

    return resolve_source(source, "text", Path(tempfile.mkdtemp())).documents()


def test_pieces_cut_files_without_changing_the_documents(tmp_path, prose):
    folder = write_corpus(tmp_path / "corpus", prose)
    for name, builder in (("a.txt", "text"), ("b.jsonl", "json")):
        path = str(folder / name)
        whole = [d for p in plan([path], builder, "text", 1 << 30) for d in read(p).docs]
        for size in (50, 333, 2048):
            pieces = list(plan([path], builder, "text", size))
            assert len(pieces) > 3
            assert [d for p in pieces for d in read(p).docs] == whole == reference_docs(path)


@pytest.mark.parametrize("tokenizer", ["char", "bpe", "bytelevel"])
def test_several_workers_give_the_same_shards(cache, tmp_path, prose, monkeypatch, tokenizer):
    folder = write_corpus(tmp_path / "corpus", prose)
    cfg = DataConfig(source=str(folder / "a.txt"), shard_tokens=4000, tokenizer=tokenizer, vocab_size=400)
    one = prepare_data(cfg)
    monkeypatch.setenv("MICRO_ARCH_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(stream_module, "SMALL", 0)  # workers even for a small corpus
    monkeypatch.setattr(prepare_module, "settings", lambda c, t: stream_module.Settings(2, 2000, c.shard_tokens))
    two = prepare_data(cfg)
    assert two.tokenizer.identity == one.tokenizer.identity
    assert np.array_equal(np.asarray(one.train), np.asarray(two.train))
    assert np.array_equal(np.asarray(one.val), np.asarray(two.val)) and one.fingerprint == two.fingerprint


def shard_bytes(cache):
    (folder,) = [p for p in (cache / "tokens").iterdir()]
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_killed_preparation_resumes_and_gives_identical_shards(cache, tmp_path, prose, monkeypatch):
    folder = write_corpus(tmp_path / "corpus", prose)
    cfg = DataConfig(source=str(folder / "a.txt"), shard_tokens=3000)
    monkeypatch.setattr(prepare_module, "settings", lambda c, t: stream_module.Settings(1, 1500, c.shard_tokens))
    whole = prepare_data(cfg)
    expected = shard_bytes(cache)
    assert sum(n.startswith("shard_") for n in expected) > 5

    monkeypatch.setenv("MICRO_ARCH_CACHE", str(tmp_path / "killed"))
    real_finish, finished = ShardWriter._finish, []

    def finish_then_die(self):
        real_finish(self)
        finished.append(self.index)
        if len(finished) == 3:
            raise KeyboardInterrupt  # killed right after the third shard went into place

    monkeypatch.setattr(ShardWriter, "_finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg)
    killed = tmp_path / "killed"
    (tokens,) = (killed / "tokens").iterdir()
    left = sorted(p.name for p in tokens.iterdir())
    assert left == ["progress.json", "shard_00000.bin", "shard_00001.bin", "shard_00002.bin"]  # no half shard
    assert json.loads((tokens / "progress.json").read_text())["shards"] == 3

    monkeypatch.setattr(ShardWriter, "_finish", real_finish)
    # started again with other settings: it goes on with the killed run's pieces and shards all the same
    monkeypatch.setattr(prepare_module, "settings", lambda c, t: stream_module.Settings(1, 2600, 7000))
    encoded = []
    real_encode = stream_module.piece_work.encode
    monkeypatch.setattr(stream_module.piece_work, "encode", lambda *a: encoded.append(1) or real_encode(*a))
    again = prepare_data(cfg)
    assert shard_bytes(killed) == expected
    n_pieces = len(json.loads(next((killed / "scans").iterdir()).read_text())["piece_docs"])
    assert 0 < len(encoded) < n_pieces - 3  # went on from the third shard, not from the start
    assert np.array_equal(np.asarray(again.train), np.asarray(whole.train)) and again.val_bytes == whole.val_bytes


# --- windows over shards ------------------------------------------------------------------------


def shards_of(tokens, cuts):
    return TokenStream([tokens[a:b] for a, b in zip([0, *cuts], [*cuts, len(tokens)])])


def test_windows_across_shards_equal_those_of_one_array():
    tokens = np.random.default_rng(0).integers(0, 60000, 2000).astype(np.uint16)
    stream = shards_of(tokens, [300, 301, 1000, 1990])
    crossed = 0
    for step in range(40):
        a, b = sample_batch(tokens, 6, 64, seed=3, step=step), sample_batch(stream, 6, 64, seed=3, step=step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        starts = torch.randint(len(tokens) - 64, (6,), generator=torch.Generator().manual_seed(3 * 0x9E3779B1 + step))
        crossed += sum(any(s < c < s + 65 for c in (300, 1000, 1990)) for s in starts.tolist())
    assert crossed > 5  # the comparison did cover windows that span two shards
    for x, y in zip(eval_batches(tokens, 4, 50, 3), eval_batches(stream, 4, 50, 3)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    for x, y in zip(iter_eval_windows(tokens, 8, 60), iter_eval_windows(stream, 8, 60)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert np.array_equal(stream[250:1100], tokens[250:1100]) and stream[1999] == tokens[1999]


def test_ddp_ranks_read_disjoint_windows_that_make_the_global_batch():
    tokens = np.arange(20000, dtype=np.uint32)  # a token's value is its position
    stream = shards_of(tokens, [5000, 10000, 15000])
    for step in range(5):
        whole = sample_batch(stream, 8, 32, seed=1, step=step)[0]
        ranks = [sample_batch(stream, 2, 32, seed=1, step=step, rank=r, world_size=4)[0] for r in range(4)]
        assert torch.equal(torch.cat(ranks), whole)
        starts = [set(r[:, 0].tolist()) for r in ranks]
        assert all(not (starts[i] & starts[j]) for i in range(4) for j in range(i + 1, 4))


def test_resume_across_a_shard_boundary_is_bit_exact(cache, tmp_path, prose):
    from micro_arch.config import TrainConfig
    from micro_arch.train.prefetch import TokenWindows

    (tmp_path / "a.txt").write_text(prose)
    data = prepare_data(DataConfig(source=str(tmp_path / "a.txt"), shard_tokens=2000))
    assert isinstance(data.train, TokenStream) and len(data.train.parts) > 10
    t = TrainConfig(batch_size=4, seq_len=48, seed=7)
    uninterrupted = [TokenWindows(data.train, t).batch(i) for i in range(12)]
    resumed = prepare_data(DataConfig(source=str(tmp_path / "a.txt"), shard_tokens=2000))  # a new process
    after = [TokenWindows(resumed.train, t).batch(i) for i in range(6, 12)]
    flat = np.asarray(data.train)
    for (x, y), (rx, ry) in zip(uninterrupted[6:], after):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    for i, (x, _) in enumerate(uninterrupted):
        assert torch.equal(x, sample_batch(flat, 4, 48, seed=7, step=i)[0])


# --- mixtures, samples, tokenizers --------------------------------------------------------------


def test_a_mixture_gives_each_source_its_token_share(cache, tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": "a" * (40 + i % 30)}) + "\n" for i in range(300)))
    b.write_text("".join(json.dumps({"text": "b" * (20 + i % 50)}) + "\n" for i in range(90)))
    cfg = DataConfig(source=[SourceConfig(str(a), weight=70), SourceConfig(str(b), weight=30)], shard_tokens=1000)
    data = prepare_data(cfg)
    text = data.tokenizer.decode(np.asarray(data.train))
    share = text.count("a") / (text.count("a") + text.count("b"))
    assert share == pytest.approx(0.7, abs=0.01)
    seen = [data.tokenizer.decode(sample_batch(data.train, 16, 64, 0, s)[0].flatten()) for s in range(60)]
    drawn = "".join(seen)
    assert drawn.count("a") / (drawn.count("a") + drawn.count("b")) == pytest.approx(0.7, abs=0.03)
    val = data.tokenizer.decode(np.asarray(data.val))  # the last 10% of each source's documents
    assert val.count("a") == sum(40 + i % 30 for i in range(270, 300))
    assert val.count("b") == sum(20 + i % 50 for i in range(81, 90))


def test_the_tokenizer_trains_on_a_bounded_sample_from_every_file(cache, tmp_path, prose, monkeypatch):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("\n\n".join(paragraphs(prose, 150, 50 * i)))
    seen = []
    real = prepare_module.train_bpe
    monkeypatch.setattr(prepare_module, "train_bpe", lambda texts, v: seen.append(list(texts)) or real(texts, v))
    data = prepare_data(DataConfig(source=str(tmp_path / "*.txt"), tokenizer="bpe", vocab_size=400,
                                   tokenizer_sample_bytes=6000))
    (texts,) = seen
    size = sum(len(t.encode()) for t in texts)
    assert 3000 < size <= 6000 + 3 * 2000  # about the bound: whole documents, up to one more per piece
    for i in range(3):  # documents from every file
        assert any(t in texts for t in paragraphs(prose, 5, 50 * i))
    assert data.tokenizer.vocab_size == 400


def test_bytelevel_bpe_round_trips_anything_and_names_the_smallest_vocab(cache, tmp_path, prose):
    (tmp_path / "a.txt").write_text(prose[:30000])
    data = prepare_data(DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bytelevel", vocab_size=600))
    tok = data.tokenizer
    assert tok.vocab_size == 600 and tok.name == "bytelevel-600"
    text = "  KING LEAR.\nWhat, ho!\tÜnseen ✓ 𝄞 42\r\n\n"
    assert tok.decode(tok.encode(text)) == text
    docs = reference_docs(str(tmp_path / "a.txt"))
    assert tok.decode(np.asarray(data.val).tolist()) == SEPARATOR.join(docs[-round(len(docs) * 0.1):])
    run_dir = tmp_path / "run"
    tok.save(run_dir)
    from micro_arch.data import load_tokenizer

    assert load_tokenizer(run_dir).encode(text) == tok.encode(text)
    with pytest.raises(MicroArchError, match="smallest that works is 256"):
        prepare_data(DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bytelevel", vocab_size=200))


def test_too_small_a_bpe_vocabulary_names_the_smallest_that_works(cache, tmp_path, prose):
    (tmp_path / "a.txt").write_text(prose[:20000] + "\n\nÜnïcödé ✓ 𝄞 ÆØÅ")
    with pytest.raises(MicroArchError, match=r"smallest that works is (\d+)") as info:
        prepare_data(DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bpe", vocab_size=300))
    import re

    smallest = int(re.search(r"smallest that works is (\d+)", str(info.value)).group(1))
    with pytest.raises(MicroArchError, match="too small"):
        prepare_data(DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bpe", vocab_size=smallest - 1))
    assert prepare_data(DataConfig(source=str(tmp_path / "a.txt"), tokenizer="bpe",
                                   vocab_size=smallest)).tokenizer.vocab_size == smallest


def test_max_tokens_cuts_the_training_split(cache, tmp_path, prose):
    (tmp_path / "a.txt").write_text(prose)
    whole = prepare_data(DataConfig(source=str(tmp_path / "a.txt"), shard_tokens=5000))
    cut = prepare_data(DataConfig(source=str(tmp_path / "a.txt"), shard_tokens=5000, max_tokens=12345))
    assert len(cut.train) == 12345 and np.array_equal(np.asarray(cut.train), np.asarray(whole.train)[:12345])
    assert np.array_equal(np.asarray(cut.val), np.asarray(whole.val))


# --- bad input ----------------------------------------------------------------------------------


def parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


@pytest.mark.parametrize("case, words", [
    ("corrupt.parquet", ["corrupt.parquet: not a readable parquet file", "whole"]),
    ("column.parquet", ["column.parquet: no column 'text' (columns: body)", "data.text_field"]),
    ("column.jsonl", ["column.jsonl: no column 'text' (columns: body, n)", "data.text_field"]),
    ("empty.parquet", ["empty.parquet: the file is empty (no rows)"]),
    ("image.txt", ["image.txt: not UTF-8 text", "byte 0 (0x89)"]),
])
def test_bad_input_is_one_line_naming_the_file_and_leaves_nothing_in_the_cache(cache, tmp_path, prose, case, words):
    folder = tmp_path / "shards"
    folder.mkdir()
    kind = case.rsplit(".", 1)[1]
    for i in range(2):
        if kind == "parquet":
            parquet(folder / f"good{i}.parquet", text=paragraphs(prose, 20, 20 * i))
        else:
            (folder / f"good{i}.{kind}").write_text("".join(json.dumps({"text": t}) + "\n" for t in paragraphs(
                prose, 20, 20 * i)) if kind == "jsonl" else "\n\n".join(paragraphs(prose, 20, 20 * i)))
    bad = folder / case
    if case == "corrupt.parquet":
        parquet(bad, text=paragraphs(prose, 20))
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif case == "column.parquet":
        parquet(bad, body=paragraphs(prose, 20))
    elif case == "column.jsonl":
        bad.write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in paragraphs(prose, 5)))
    elif case == "empty.parquet":
        import pyarrow as pa

        parquet(bad, text=pa.array([], pa.string()))
    else:
        bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(MicroArchError) as info:
        prepare_data(DataConfig(source=str(folder / f"*.{kind}")))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for word in words:
        assert word in message, (word, message)
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert not [p for p in left if "tokens" in p.parts or p.name.endswith(".tmp")], left


def test_a_non_text_file_among_text_files_is_refused_by_kind(cache, tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    with pytest.raises(MicroArchError, match="b.bin: micro-arch does not read '.bin' files"):
        prepare_data(DataConfig(source=str(tmp_path / "*")))
    assert os.path.exists(tmp_path / "a.txt")


# --- hub datasets, streamed ---------------------------------------------------------------------


def test_a_hub_dataset_is_streamed_only_up_to_the_token_budget(cache, tmp_path, monkeypatch):
    """No network here: the hub's load_dataset is pointed at local JSON-lines files, in streaming mode."""
    import datasets

    from micro_arch.data import hub

    files = []
    for k in range(4):
        path = tmp_path / f"hub-{k}.jsonl"
        path.write_text("".join(json.dumps({"text": f"doc {k}-{i} " + "x" * 90, "id": i}) + "\n" for i in range(500)))
        files.append(str(path))
    served, modes = [], []
    real = datasets.load_dataset

    def local_hub(name, streaming=False, **kw):
        assert name == "someone/corpus"
        modes.append(streaming)
        loaded = real("json", data_files=files, streaming=streaming)

        class Counted(dict):  # counts the rows handed out, to see that the stream stopped early
            def __getitem__(self, split):
                for row in dict.__getitem__(self, split):
                    served.append(1)
                    yield row

        return Counted(loaded)

    monkeypatch.setattr(hub, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    cfg = DataConfig(source="someone/corpus", max_tokens=20_000, val_fraction=0.1)
    data = prepare_data(cfg)
    assert modes == [True] and len(data.train) == 20_000  # char: 20,000 tokens, cut at the budget
    assert 20_000 / 0.9 <= len(served) * 100 < 20_000 / 0.9 + 2 * 110 and len(served) < 300  # of 2000 rows
    text = data.tokenizer.decode(np.asarray(data.val))
    assert text.startswith("doc 0-") and len(data.val) > 1000
    again = prepare_data(cfg)  # from the cache: nothing streamed again
    assert modes == [True] and again.fingerprint == data.fingerprint
    bigger = prepare_data(DataConfig(source="someone/corpus", max_tokens=40_000))
    assert bigger.fingerprint != data.fingerprint and len(bigger.train) == 40_000


def test_an_unreachable_hub_stays_a_one_line_error(cache, monkeypatch):
    from micro_arch.data import hub

    monkeypatch.setattr(hub, "hub_offline_reason", lambda: "HF_HUB_OFFLINE is set")
    with pytest.raises(MicroArchError) as info:
        prepare_data(DataConfig(source="someone/not-cached-anywhere", max_tokens=1000))
    assert len(str(info.value).splitlines()) == 1 and "could not reach the Hugging Face hub" in str(info.value)
    assert not list((cache / "hub").glob("*")) if (cache / "hub").exists() else True


# --- micro-arch prepare ---------------------------------------------------------------------------


def test_prepare_command_shows_the_plan_then_prepares(tmp_path, prose, monkeypatch, capsys):
    from micro_arch.commands import prepare as command

    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"{i}.txt").write_text("\n\n".join(paragraphs(prose, 60, 60 * i)))
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text(f"data: {{source: '{tmp_path / 'texts'}', tokenizer: char}}\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MICRO_ARCH_CACHE", str(cache))
    monkeypatch.setattr(command.console, "width", 200)
    result = command.prepare_command(exp)
    out = capsys.readouterr().out
    size = sum(p.stat().st_size for p in (tmp_path / "texts").iterdir())
    assert "data plan of exp" in out and str(tmp_path / "texts") in out and f"{size / 1e3:,.1f} KB" in out
    assert f"~{size:,}" in out and f"cache: {cache}" in out and "prepared:" in out
    shards = list(cache.glob("tokens/*/shard_00000.bin"))
    assert len(shards) == 1 and (shards[0].parent / "DONE").is_file()
    assert result["train_tokens"] + result["val_tokens"] + 2 == shards[0].stat().st_size // 2
    assert "workers: 1 process(es)" in out and "raise it" not in out  # 67 KB: prepared in this process
    with pytest.raises(MicroArchError, match="missing.txt: no such file"):
        command.prepare_command(exp, [f"data.source={tmp_path / 'missing.txt'}"])
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # a machine of many cores: the memory bound says what to raise
    command.prepare_command(exp)
    out = capsys.readouterr().out
    assert "data.prepare_memory_mb=1024 leaves room for 11 of this machine's 64 CPUs: raise it" in out


def test_a_run_on_many_shards_resumes_exactly(tmp_path, tiny_experiment):
    """The trainer on a split of ~25 shards: killed after step 12 and resumed, it matches the run that went on."""
    import shutil

    from helpers import read_metrics

    from micro_arch.commands.run import run_experiment

    exp = tiny_experiment()
    sets = [f"data.cache_dir={tmp_path / 'cache'}", "data.shard_tokens=200000"]
    full = run_experiment(exp, runs_root=tmp_path / "runs", overrides=sets)
    assert len(list((tmp_path / "cache").glob("tokens/*/shard_*.bin"))) > 20
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    shutil.copy(stopped / "checkpoints/step_0000012.pt", stopped / "checkpoints/latest.pt")
    (stopped / "checkpoints/step_0000024.pt").unlink()
    run_experiment(exp, runs_root=tmp_path / "runs", overrides=sets, resume=stopped)
    a, b = read_metrics(full), read_metrics(stopped)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if ra[key]:
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-5, abs=1e-6), (ra["step"], key)


def test_compressed_files_give_the_tokens_of_the_plain_ones(cache, tmp_path, prose, monkeypatch):
    import gzip
    import lzma

    folder = write_corpus(tmp_path / "corpus", prose)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "b.jsonl.gz").write_bytes(gzip.compress((folder / "b.jsonl").read_bytes()))
    (tmp_path / "xz").mkdir()
    (tmp_path / "xz" / "a.txt.xz").write_bytes(lzma.compress((folder / "a.txt").read_bytes()))
    monkeypatch.setattr(prepare_module, "settings", lambda c, t: stream_module.Settings(1, 700, c.shard_tokens))
    for plain, packed in (("b.jsonl", "gz/b.jsonl.gz"), ("a.txt", "xz/a.txt.xz")):
        a = prepare_data(DataConfig(source=str(folder / plain)))
        b = prepare_data(DataConfig(source=str(tmp_path / packed)))
        assert np.array_equal(np.asarray(a.train), np.asarray(b.train)) and a.val_bytes == b.val_bytes


def test_hub_conversations_are_streamed_into_the_cache_for_sft(tmp_path, monkeypatch):
    import datasets

    from micro_arch.data import hub
    from micro_arch.stages.records import read_records

    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}],
             "prompt_id": str(i)} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real, calls = datasets.load_dataset, []

    def local_hub(name, streaming=False, **kw):
        calls.append((name, streaming))
        return real("json", data_files=[str(path)], streaming=streaming)

    monkeypatch.setattr(hub, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    records = read_records("someone/chats", tmp_path / "cache", "conversations")
    assert [r for _, r in records] == rows and records[0][0] == "part-00000.jsonl line 1"
    assert read_records("someone/chats", tmp_path / "cache", "conversations") == records
    assert calls == [("someone/chats", True)]  # streamed once, then read from the cache


def test_a_text_piece_joined_without_splitting_equals_its_documents_joined():
    from micro_arch.data.documents import Piece, joined_utf8

    rng = np.random.default_rng(0)
    for _ in range(5000):
        parts = rng.choice(["a", "b c", "é", "🧙", "\n", "\n\n", "\n\n\n", "\n\n\n\n\n", "\r\n", "\r", " "],
                           size=rng.integers(0, 10))
        data = "".join(parts).encode()
        piece = Piece("x.txt", "text", 0, len(data), len(data), data=data)
        docs = read(piece).docs
        assert joined_utf8(piece) == (SEPARATOR.join(docs).encode(), len(docs)), (data, docs)


@pytest.mark.parametrize("workers", [1, 2])
def test_char_shards_of_text_in_every_script_equal_the_whole_file_tokens(cache, tmp_path, prose, monkeypatch,
                                                                         workers):
    """A piece's text is decoded and looked up a part at a time (piece_work.PART bytes): parts cut between
    characters of 1 to 4 bytes, in ASCII and other parts, give the tokens of the whole file."""
    from micro_arch.data import piece_work

    words = [w for w in prose.split(" ") if w] + ["é", "Ünïcödé", "✓ ", "𝄞", "日本語", "🧙\n\n"]
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice(words, size=20_000))
    path = tmp_path / "mixed.txt"
    path.write_text(text.replace("\n\n", "\r\n\r\n", 30), newline="")
    monkeypatch.setattr(piece_work, "PART", 97)  # many parts, cut at every kind of character
    monkeypatch.setattr(stream_module, "SMALL", 0)
    monkeypatch.setattr(prepare_module, "settings", lambda c, t: stream_module.Settings(workers, 5000, 7000))
    data = prepare_data(DataConfig(source=str(path), val_fraction=0.1))
    assert set(data.tokenizer.chars) == set(text.replace("\r", ""))
    train, val, val_bytes = reference(str(path), "text", 0.1, data.tokenizer)
    assert np.array_equal(np.asarray(data.train), train) and np.array_equal(np.asarray(data.val), val)
    assert data.val_bytes == val_bytes
    assert not list(cache.rglob(".piece_*")), "a worker's piece file was left behind"


def test_bad_bytes_deep_in_a_file_name_the_byte_and_leave_no_piece_files(cache, tmp_path, prose, monkeypatch):
    path = tmp_path / "late.txt"
    good = "\n\n".join(paragraphs(prose, 300)).encode()
    path.write_bytes(good + b"\n\ncaf\xe9 au lait\n\n" + good)
    monkeypatch.setattr(stream_module, "SMALL", 0)
    monkeypatch.setattr(prepare_module, "settings", lambda c, t: stream_module.Settings(2, 4000, 7000))
    with pytest.raises(MicroArchError, match=f"late.txt: not UTF-8 text: byte {len(good) + 5} \\(0xe9\\)"):
        prepare_data(DataConfig(source=str(path)))
    assert not [p for p in cache.rglob("*") if p.is_file() and ("tokens" in p.parts or ".piece_" in p.name)]
