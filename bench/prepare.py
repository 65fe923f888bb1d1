"""Preparing a real corpus in bounded memory (issue 21): MB/s and peak resident memory of `prepare_data`, for a
~100 MB and a ~1 GB local corpus, char and BPE, against the tokenizer library's own parallel batch encode.

The corpus is real text found on the machine: Python sources and docs (.py, .txt, .md, .rst) under
/usr/lib/python3* and the virtual environment's site-packages, sorted by path, concatenated (files joined by a
blank line) into .txt parts of 64 MB, cycled when there is less than asked for (say so when reporting).

For each (size, tokenizer), in a fresh cache, in a child process whose whole process tree is sampled for its
resident memory (the sum over the process and its workers, every 20 ms; the interpreter and its imports
included); MB/s times the prepare_data call (worker start-up included, interpreter start-up not):
  full      prepare_data from nothing: scan, tokenizer training (BPE: on data.tokenizer_sample_bytes), encode
  encode    prepare_data again with the tokenizer kept and the shards removed: scan + encode + write
  library   the library's own parallel batch encode of the same text, in memory, with as many threads as
            preparation has processes (SentencePiece encode(num_threads=N), tokenizers encode_batch); char has
            no library: its reference is one process encoding with the same table lookup
Checks: the 1 GB peak <= 1.2x the 100 MB peak and < 2 GB; encode >= 0.8x library; char >= 50 MB/s.

    python bench/prepare.py                                   # 100 MB and 1 GB, char and bpe (a quiet machine)
    python bench/prepare.py --sizes 2 8 --tokenizers char bpe --vocab 2000 --sample-mb 2   # a tiny check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART = 64 << 20
TEXT = (".py", ".txt", ".md", ".rst")


def text_files():
    roots = sorted(Path("/usr/lib").glob("python3*")) + [Path(p) for p in sys.path if p.endswith("site-packages")]
    seen = set()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix in TEXT and path.is_file() and path.resolve() not in seen:
                seen.add(path.resolve())
                yield path


def build_corpus(folder: Path, size: int) -> int:
    """Parts of real text adding up to `size` bytes (cycling through the files if needed); the bytes written."""
    if (folder / "DONE").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.txt"))
    folder.mkdir(parents=True, exist_ok=True)
    written, part, out, cycles = 0, 0, None, 0
    while written < size:
        cycles += 1
        found = False
        for path in text_files():
            try:
                text = path.read_bytes()
                text.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip() or b"\x00" in text:
                continue
            found = True
            if out is None or out.tell() >= PART:
                if out is not None:
                    out.close()
                out, part = open(folder / f"part-{part:04d}.txt", "wb"), part + 1
            out.write(text.rstrip(b"\n") + b"\n\n")
            written += len(text) + 2
            if written >= size:
                break
        if not found:
            raise SystemExit("no text files found")
    out.close()
    (folder / "DONE").write_text(f"cycles={cycles}\n")
    return written


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measured(code: str, env: dict) -> tuple[float, int, str]:
    """(seconds, peak resident bytes of the process tree, stdout) of `python -c code`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed:\n{err[-3000:]}")
    return seconds, peak[0], out


PREPARE = """
import json, time
from micro_arch.config import DataConfig
from micro_arch.data.prepare import prepare_data
from micro_arch.data.stream import settings
cfg = DataConfig(source={source!r}, tokenizer={tokenizer!r}, vocab_size={vocab}, cache_dir={cache!r},
                 workers={workers}, tokenizer_sample_bytes={sample}, val_fraction=0.01, prepare_memory_mb={memory})
t0 = time.perf_counter()
data = prepare_data(cfg, quiet=True)
print(json.dumps({{"tokens": len(data.train) + len(data.val), "seconds": time.perf_counter() - t0,
                  "workers": settings(cfg, 10**12).workers}}))
"""

LIBRARY = """
import glob, json, os, time
from micro_arch.config import DataConfig
from micro_arch.data.prepare import Corpus, load_cached_tokenizer, tokenizer_path
from micro_arch.data.shards import cache_root
cfg = DataConfig(source={source!r}, tokenizer={tokenizer!r}, vocab_size={vocab}, cache_dir={cache!r},
                 tokenizer_sample_bytes={sample}, val_fraction=0.01)
root = cache_root(cfg.cache_dir)
tok = load_cached_tokenizer(cfg, tokenizer_path(cfg, Corpus(cfg, root), root))
seconds, tokens = 0.0, 0
for path in sorted(glob.glob({source!r})):
    text = open(path, encoding="utf-8").read()
    step = 16 << 20
    for at in range(0, len(text), step):
        docs = [d for d in text[at:at + step].split("\\n\\n") if d]
        t0 = time.perf_counter()
        if hasattr(tok, "sp"):
            ids = tok.sp.encode(docs, num_threads={workers})
        elif hasattr(tok, "tok"):
            ids = [e.ids for e in tok.tok.encode_batch(docs, add_special_tokens=False)]
        else:
            ids = [tok.encode_array("\\n\\n".join(docs))]
        seconds += time.perf_counter() - t0
        tokens += sum(len(i) for i in ids)
print(json.dumps({{"seconds": seconds, "tokens": tokens}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[100, 1000], help="corpus sizes in MB")
    parser.add_argument("--tokenizers", nargs="+", default=["char", "bpe"], choices=["char", "bpe", "bytelevel"])
    parser.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary size")
    parser.add_argument("--sample-mb", type=float, default=100, help="data.tokenizer_sample_bytes, in MB")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="data.workers (at most; "
                        "data.prepare_memory_mb may allow fewer)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="data.prepare_memory_mb")
    parser.add_argument("--out", default=None, help="corpora and caches go here (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-prepare-"))
    env = {"OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": str(args.workers), "PYTHONPATH": str(ROOT)}
    print(f"{os.cpu_count()} CPUs, {args.workers} workers; corpora and caches in {out}")
    results = {}
    for size_mb in args.sizes:
        folder = out / f"corpus-{size_mb:g}MB"
        size = build_corpus(folder, int(size_mb * 1e6))
        source = str(folder / "*.txt")
        for tokenizer in args.tokenizers:
            cache = out / f"cache-{size_mb:g}MB-{tokenizer}"
            shutil.rmtree(cache, ignore_errors=True)
            fields = dict(source=source, tokenizer=tokenizer, vocab=args.vocab, cache=str(cache),
                          workers=args.workers, sample=int(args.sample_mb * 1e6), memory=args.memory_mb)
            _, full_peak, found = measured(PREPARE.format(**fields), env)
            found = json.loads(found.strip().splitlines()[-1])
            tokens, full_s = found["tokens"], found["seconds"]
            shutil.rmtree(cache / "tokens")
            shutil.rmtree(cache / "scans")
            _, enc_peak, found = measured(PREPARE.format(**fields), env)
            found = json.loads(found.strip().splitlines()[-1])
            enc_s, workers = found["seconds"], found["workers"]
            # the library gets as many threads as preparation had processes (data.prepare_memory_mb may allow
            # fewer workers than --workers)
            _, _, lib = measured(LIBRARY.format(**{**fields, "workers": workers}),
                                 {**env, "RAYON_NUM_THREADS": str(workers)})
            lib = json.loads(lib.strip().splitlines()[-1])
            row = {"MB": size / 1e6, "tokens": tokens, "full_MBps": size / 1e6 / full_s,
                   "full_peak_MB": full_peak / 1e6, "encode_MBps": size / 1e6 / enc_s,
                   "encode_peak_MB": enc_peak / 1e6, "library_MBps": size / 1e6 / lib["seconds"],
                   "vs_library": (size / enc_s) / (size / lib["seconds"])}
            results[(size_mb, tokenizer)] = row
            print(f"{size / 1e6:8.1f} MB {tokenizer:9s} {workers:2d} proc full {row['full_MBps']:7.1f} MB/s peak "
                  f"{row['full_peak_MB']:7.0f} MB | encode {row['encode_MBps']:7.1f} MB/s peak "
                  f"{row['encode_peak_MB']:7.0f} MB | library {row['library_MBps']:7.1f} MB/s -> "
                  f"{row['vs_library']:.2f}x | {tokens:,} tokens", flush=True)
    failures = 0
    small, large = min(args.sizes), max(args.sizes)
    for tokenizer in args.tokenizers:
        a, b = results[(small, tokenizer)], results[(large, tokenizer)]
        peak_a, peak_b = max(a["full_peak_MB"], a["encode_peak_MB"]), max(b["full_peak_MB"], b["encode_peak_MB"])
        checks = [(f"{tokenizer}: {large:g} MB peak {peak_b:.0f} MB <= 1.2x the {small:g} MB peak {peak_a:.0f} MB",
                   peak_b <= 1.2 * peak_a),
                  (f"{tokenizer}: {large:g} MB peak {peak_b:.0f} MB < 2000 MB", peak_b < 2000)]
        if tokenizer != "char":
            checks.append((f"{tokenizer}: encode at {b['vs_library']:.2f}x the library's batch encode (>= 0.8)",
                           b["vs_library"] >= 0.8))
        else:
            checks.append((f"char: {b['encode_MBps']:.1f} MB/s (>= 50)", b["encode_MBps"] >= 50))
        for what, ok in checks:
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {what}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
