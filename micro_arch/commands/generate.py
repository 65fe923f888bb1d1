"""`micro-arch generate RUN_DIR --prompt ...`: sample from a trained run with its KV cache."""

from __future__ import annotations

import time

import torch

from micro_arch.eval.generate import sample_texts


def generate_command(run_dir, prompts: list[str] | None = None, max_new_tokens: int = 200,
                     temperature: float = 0.8, top_k: int | None = 200, top_p: float | None = None, seed: int = 0,
                     checkpoint=None, device: str = "auto", num_samples: int = 1) -> None:
    """`micro-arch generate RUN_DIR --prompt ...`: print each sample, prompt in bold, and the speed."""
    from rich.console import Console
    from rich.text import Text

    from micro_arch.commands.evaluate import note_unfinished
    from micro_arch.device import resolve_device
    from micro_arch.rundir import load_run

    console = Console()
    device = resolve_device(device, option="--device")
    cfg, model, tokenizer = load_run(run_dir, checkpoint, device)
    note_unfinished(console, run_dir, "sampling from", checkpoint)
    prompts = prompts or cfg.train.sample.prompts
    start = time.perf_counter()
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         num_samples=num_samples)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    for i, text in enumerate(texts):
        prompt = prompts[i // num_samples]
        title = f"{prompt!r}" + (f" sample {i % num_samples + 1}" if num_samples > 1 else "")
        console.rule(title)
        console.print(Text(prompt, style="bold") + Text(text), highlight=False)
    n_tokens = len(texts) * max_new_tokens
    console.print(f"[dim]{n_tokens:,} tokens in {elapsed:.2f} s: {n_tokens / max(elapsed, 1e-9):,.0f} tokens/s "
                  f"on {device}[/]")
