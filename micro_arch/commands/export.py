"""`micro-arch export RUN_DIR --out DIR`: a transformers folder, its logits checked against the run's."""

from __future__ import annotations

from micro_arch.hf.export import export_run


def export_command(run_dir, out, checkpoint=None, dtype: str = "float32", max_shard_size: str = "2GB") -> None:
    from rich.console import Console

    result = export_run(run_dir, out, checkpoint, dtype, max_shard_size)
    Console().print(f"exported {result['hf_class']} to {result['out']} ({', '.join(result['files'])}); logits "
                    f"checked: max |difference| {result['max_abs_diff']:.2e} (tolerance {result['tolerance']:.1e})",
                    soft_wrap=True)
