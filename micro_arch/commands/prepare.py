"""`micro-arch prepare EXPERIMENT`: the data plan (files, bytes, estimated tokens, disk, cache folder), then
the token shards, in bounded memory. `run` prepares the same way on demand; this only does it ahead."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def prepare_command(experiment, overrides: list[str] = ()) -> dict:
    from micro_arch.data.prepare import data_plan, prepare_data
    from micro_arch.experiment import load_experiment
    from micro_arch.stages.vocab import reads_records

    cfg = load_experiment(experiment, list(overrides))
    plan = records_plan(cfg) if reads_records(cfg) else data_plan(cfg.data)
    table = Table(title=f"data plan of {cfg.name}", title_justify="left")
    for column, right in (("source", False), ("files", True), ("bytes", True), ("est. tokens", True),
                          ("disk", True)):
        table.add_column(column, justify="right" if right else "left")
    for row in plan["sources"]:
        table.add_row(row["source"], f"{row['files']:,}" if row["files"] else "-", megabytes(row["bytes"]),
                      f"~{row['tokens']:,}" if row["tokens"] is not None else "?",
                      megabytes(row["disk"]) if row["disk"] is not None else "?")
    console.print(table)
    console.print(f"tokenizer: {plan['tokenizer']}; cache: {plan['cache']}"
                  + (f"; training tokens cut at {cfg.data.max_tokens:,}" if cfg.data.max_tokens else ""))
    if "workers" in plan:
        console.print(workers_line(plan["workers"], cfg.data.prepare_memory_mb), highlight=False)
    if reads_records(cfg):
        if not cfg.model.init_from:  # the records are ready; their tokens are init_from's tokenizer's
            console.print("records ready; they are encoded with model.init_from's tokenizer when the run starts "
                          "(give --set model.init_from=RUN_DIR to check them now)")
            return {"plan": plan}
        from micro_arch.stages import stage_of

        data = stage_of(cfg).prepare_data(cfg)
        for note in data.notes:
            console.print(note)
        return {"plan": plan}
    data = prepare_data(cfg.data)
    console.print(f"prepared: {len(data.train):,} training and {len(data.val):,} held-out tokens "
                  f"(vocabulary {data.tokenizer.vocab_size:,}, fingerprint {data.fingerprint})")
    return {"plan": plan, "train_tokens": len(data.train), "val_tokens": len(data.val)}


def records_plan(cfg) -> dict:
    """Conversations or preference pairs: the files of data.source and data.val_source (built-in chat data
    is made into the cache here)."""
    import os

    from micro_arch.data.shards import cache_root
    from micro_arch.data.sources import local_files
    from micro_arch.stages.builtin_chat import builtin_file, is_builtin

    root, rows = cache_root(cfg.data.cache_dir), []
    for source in filter(None, [cfg.data.source, cfg.data.val_source]):
        if not isinstance(source, str):
            continue  # a list: prepare_stage_data says that a stage reads one source
        files = local_files(builtin_file(source, root) if is_builtin(source) else source)
        rows.append({"source": source, "files": len(files), "bytes": sum(os.path.getsize(f) for f in files),
                     "tokens": None, "disk": None})
    return {"sources": rows, "tokenizer": "model.init_from's, with the chat template's tokens", "cache": str(root)}


def workers_line(w: dict, memory_mb: int) -> str:
    """How many processes prepare, and when data.prepare_memory_mb is what keeps CPUs idle, what to raise."""
    line = f"workers: {w['processes']} process(es), pieces of {megabytes(w['piece_bytes'])}"
    if not w["chosen"] and w["memory_allows"] < w["cpus"]:
        line += (f"; data.prepare_memory_mb={memory_mb} leaves room for {w['memory_allows']} of this machine's "
                 f"{w['cpus']} CPUs: raise it (about 80 MB a worker) to use more")
    return line


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} KB"
