"""`micro-arch trace EXPERIMENT`: one forward pass on a dummy batch, shapes through every module as a rich tree."""

from __future__ import annotations

from rich.console import Console

from micro_arch.errors import MicroArchError

console = Console()


def trace_command(experiment, overrides: list[str] = (), depth: int | None = None, batch: int | None = None,
                  seq_len: int | None = None, out=None) -> None:
    import torch

    from micro_arch.config import experiment_path
    from micro_arch.experiment import build_model, load_experiment
    from micro_arch.model.trace import render, trace_model, trace_text
    from micro_arch.stages.vocab import reads_records, stage_vocab_size

    cfg = load_experiment(experiment, list(overrides))
    if reads_records(cfg) and cfg.model.vocab_size is None:  # its vocabulary is init_from's, not the data's
        cfg.model.vocab_size = stage_vocab_size(cfg, experiment_path(experiment))
    model = build_model(cfg)
    batch = cfg.train.batch_size if batch is None else batch
    seq = cfg.train.seq_len if seq_len is None else seq_len
    if seq > cfg.model.max_seq_len:
        raise MicroArchError(f"--seq-len {seq} is longer than model.max_seq_len={cfg.model.max_seq_len}; "
                             "pass a shorter --seq-len or raise model.max_seq_len (--set model.max_seq_len=...)")
    idx = torch.zeros(batch, seq, dtype=torch.long)
    tree = render(trace_model(model, idx), depth=depth)
    console.print(tree)
    console.print(f"[bold]{cfg.name}[/]: {model.num_params():,} parameters "
                  f"({model.num_params(non_embedding=True):,} without embeddings), "
                  f"{model.flops_per_token(seq):,.0f} training FLOPs per token at seq_len {seq}")
    if out:
        try:
            out.write_text(trace_text(tree))
        except OSError as err:  # checked while parsing; the disk may still fill up or the folder go
            raise MicroArchError(f"--out {out}: cannot write the trace: {err.strerror or err}") from None
        console.print(f"written to {out}")
