"""Perplexity on any text: `micro-arch eval RUN_DIR --data SOURCE` and `micro-arch compare RUN... --data SOURCE`.

SOURCE is anything data.source accepts: a .txt/.jsonl/.parquet file, a glob or folder of them, a hub dataset
already in the local cache, or 'shakespeare' (its held-out works: the training works were seen). Every
document of a file source is evaluated. Text the run's tokenizer cannot encode is counted and reported, not
hidden: characters missing from a char vocabulary are left out of the evaluated text (and counted), and
SentencePiece pieces that come out as <unk> are counted. Bits per byte divide by the UTF-8 bytes of the text
actually predicted, so runs with different tokenizers compare fairly on the same SOURCE.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np

from micro_arch.errors import MicroArchError


def source_documents(source: str, text_field: str = "text") -> list[str]:
    """The documents of SOURCE (for 'shakespeare', its held-out works)."""
    from micro_arch.data.corpus import shakespeare_documents
    from micro_arch.data.shards import cache_root
    from micro_arch.data.sources import BuiltinSource, FileSource, resolve_source

    src = resolve_source(source, text_field, cache_root(None))
    if isinstance(src, BuiltinSource):
        return shakespeare_documents()[1]
    if isinstance(src, FileSource):
        docs = src.documents(option="--data", field_option="--text-field")
    else:
        train, val = src.split(0.5)
        docs = train + val
    if not docs:
        raise MicroArchError(f"{source}: no text to evaluate on")
    return docs


def encode_counting(tokenizer, docs: list[str]) -> tuple[np.ndarray, dict]:
    """Token ids of the documents joined by the corpus separator, and what could not be encoded."""
    from micro_arch.data import SEPARATOR

    unknown: collections.Counter = collections.Counter()
    n_chars = sum(len(d) for d in docs)
    text = SEPARATOR.join(docs)
    if hasattr(tokenizer, "chars"):  # a char vocabulary: characters outside it are removed and counted
        known = set(tokenizer.chars)
        outside = {c for c in set(text) if c not in known}
        if outside:
            unknown.update(c for c in text if c in outside)
            text = re.sub("[" + re.escape("".join(sorted(outside))) + "]", "", text)
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer.encode(text)
        unk = tokenizer.sp.unk_id() if hasattr(tokenizer, "sp") else None
        if unk is not None and unk >= 0:
            n_unk = sum(1 for i in ids if i == unk)
            if n_unk:
                unknown["<unk> pieces"] = n_unk
    report = {"characters": n_chars, "unencodable": sum(unknown.values()),
              "unencodable_top": [[c, n] for c, n in unknown.most_common(10)]}
    return np.asarray(ids, dtype=np.int64), report


def evaluate_on_data(run_dir, source: str, checkpoint=None, batch_size: int = 32, max_batches: int | None = None,
                     device: str = "auto", text_field: str = "text") -> dict:
    """The run's metrics (evaluate.evaluate) on SOURCE, with the unencodable text counted."""
    from micro_arch.device import resolve_device
    from micro_arch.eval.evaluate import evaluate
    from micro_arch.rundir import load_run

    device = resolve_device(device, option="--device")
    cfg, model, tokenizer = load_run(run_dir, checkpoint, device)
    tokens, report = encode_counting(tokenizer, source_documents(source, text_field))
    if len(tokens) < 2:
        raise MicroArchError(f"{source}: fewer than 2 tokens left to evaluate after removing "
                             f"{report['unencodable']} characters the run's tokenizer cannot encode")
    seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
    result = evaluate(model, tokens, seq_len, batch_size, device, max_batches=max_batches, tokenizer=tokenizer)
    return result | {"data": source, "tokenizer": tokenizer.name, "seq_len": seq_len, **report}


def unencodable_line(result: dict) -> str:
    n, total = result["unencodable"], result["characters"]
    if not n:
        return f"every character of the {total:,} could be encoded"
    examples = ", ".join(f"{c!r} x{k}" for c, k in result["unencodable_top"])
    return (f"{n:,} of {total:,} characters ({n / max(total, 1):.2%}) cannot be encoded by the run's tokenizer "
            f"and were left out: {examples}")


def compare_on_data(run_dirs: list[str], source: str, out=None, batch_size: int = 32,
                    max_batches: int | None = None, device: str = "auto", console=None,
                    text_field: str = "text") -> list[dict]:
    """Evaluate every run on SOURCE and rank them by bits per byte (lower is better); writes
    data_ranking.{md,json} to `out` when given."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from micro_arch.rundir import read_summary

    console = console or Console()
    rows, left_out = [], []
    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        if summary.get("status") == "diverged":  # its last finite weights are not what the run was meant to be
            left_out.append(f"{run_dir}: diverged at step {summary.get('diverged_at_step')} (a non-finite loss), "
                            "so it is not ranked")
            continue
        result = evaluate_on_data(run_dir, source, batch_size=batch_size, max_batches=max_batches, device=device,
                                  text_field=text_field)
        rows.append({"run": str(run_dir), **{k: result[k] for k in (
            "bits_per_byte", "val_loss", "perplexity", "top1", "n_tokens", "n_bytes", "tokenizer", "unencodable",
            "characters")}})
    for line in left_out:
        console.print(f"[red]left out[/]: {escape(line)}")
    if not rows:
        raise MicroArchError(f"none of the {len(run_dirs)} runs can be ranked on {source} (the lines above say why)")
    rows.sort(key=lambda r: r["bits_per_byte"])
    table = Table(title=f"runs ranked on {source} (bits per byte, lower is better)")
    for col in ("#", "run", "bits/byte", "loss/token", "tokenizer", "unencodable chars"):
        table.add_column(col)
    lines = ["| # | run | bits/byte | loss/token | tokenizer | unencodable chars |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), "/".join(Path(r["run"]).parts[-2:]), f"{r['bits_per_byte']:.4f}", f"{r['val_loss']:.4f}", r["tokenizer"],
                 f"{r['unencodable']:,} of {r['characters']:,}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data_ranking.md").write_text(f"# Runs ranked on {source}\n\n" + "\n".join(lines) + "\n")
        (folder / "data_ranking.json").write_text(json.dumps(rows, indent=2) + "\n")
        console.print(f"written to {folder}/data_ranking.md")
    return rows
