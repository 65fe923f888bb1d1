"""A run directory as an lm-evaluation-harness model, registered as `micro-arch` when this module is imported.

    import micro_arch.eval.harness  # noqa: F401  (registers the model)
    lm_eval.simple_evaluate(model="micro-arch", model_args="run=runs/llama/<id>", tasks=[...])

Any architecture the registry builds works (the run's own blocks.py included: micro_arch.rundir.load_run loads
it). Scores follow lm-eval's `hf` model: the same request tokens, the same left truncation to the model's
context, the same rolling windows (micro_arch.eval.scoring), the document boundary as BOS/EOS as in an export
(micro_arch.data.boundary), so an exported Llama-style run gets the same numbers from both. Generation is
greedy unless a task asks for sampling, with the KV cache of micro_arch.eval.generate, prompts of one length
batched together, and stops at the task's stop strings and at the end-of-text token's text (as lm-eval's
`hf` model adds it). SFT/DPO runs get their chat template only with `apply_chat_template`.

model_args: run (required), checkpoint, device (auto), precision (fp32 | bf16 | auto), max_gen_toks (256);
batch_size comes from lm-eval's own argument ("auto" is 16).
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models first: an empty registry is what makes it load them)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from micro_arch.errors import MicroArchError

AUTO_BATCH_SIZE = 16


def parse_batch_size(value) -> int:
    """lm-eval's batch_size: an int, a digit string, or 'auto' / 'auto:N' (no search here: AUTO_BATCH_SIZE)."""
    if value is None or str(value).startswith("auto"):
        return AUTO_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise MicroArchError(f"batch_size {value!r}: a positive integer or 'auto'") from None
    if size < 1:
        raise MicroArchError(f"batch_size {value!r}: a positive integer or 'auto'")
    return size


@register_model("micro-arch")
class MicroArchLM(TemplateLM):
    backend = "causal"

    def __init__(self, run=None, checkpoint=None, device="auto", batch_size=None, precision: str = "fp32",
                 max_gen_toks: int = 256, max_batch_size=None, **unused):
        super().__init__()
        from micro_arch.device import resolve_device
        from micro_arch.eval.run_text import RunText
        from micro_arch.rundir import load_run

        if not run:
            raise MicroArchError("the micro-arch model needs model_args run=RUN_DIR")
        if precision not in ("fp32", "bf16", "auto"):
            raise MicroArchError(f"precision {precision!r}: fp32, bf16 or auto")
        device = resolve_device(device or "auto")
        cfg, model, tokenizer = load_run(run, checkpoint, device)
        self._serve(Path(run), cfg, model, RunText(run, tokenizer), device, batch_size, precision, max_gen_toks)

    def _serve(self, run_dir, cfg, model, text, device, batch_size, precision, max_gen_toks) -> None:
        self.run_dir, self.cfg, self.model, self.text, self._device = run_dir, cfg, model, text, device
        self.batch_size = parse_batch_size(batch_size)
        self.precision, self._max_gen_toks = precision, int(max_gen_toks)
        self.generator = torch.Generator(device=device).manual_seed(0)

    @classmethod
    def for_model(cls, cfg, model, tokenizer, batch_size=None, device="cpu", precision: str = "fp32",
                  max_gen_toks: int = 256, run_dir=".") -> MicroArchLM:
        """The same model around weights already in memory (a benchmark, a notebook): `cfg` an
        ExperimentConfig, `tokenizer` a micro-arch tokenizer (run_dir: where a chat run's template lives)."""
        from micro_arch.eval.run_text import RunText

        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._serve(Path(run_dir), cfg, model.eval(), RunText(run_dir, tokenizer), torch.device(device), batch_size,
                  precision, max_gen_toks)
        return lm

    # what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.text.end_id

    @property
    def max_length(self) -> int:
        return self.cfg.model.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"micro-arch:{self.run_dir.resolve()}"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.text.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = False) -> str:
        return self.text.decode(tokens)

    def chat_template(self, chat_template=False) -> str | None:
        if not chat_template:
            return None
        from micro_arch.hf.tokenizer import CHAT_TEMPLATE

        self.text.render([])  # a run without a template says so here, in one line
        return CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.text.render(chat_history, add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from micro_arch.eval.scoring import continuation_logprobs

        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        with _progress("log-likelihood", len(pairs), disable_tqdm) as advance:
            return continuation_logprobs(self.model, pairs, self.max_length, self.batch_size, self._device,
                                         self.precision, advance)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from micro_arch.eval.scoring import continuation_logprobs, rolling_windows

        windows, owner = [], []
        for i, req in enumerate(requests):
            for window in rolling_windows(self.tok_encode(req.args[0]), self.eot_token_id, self.max_length):
                windows.append(window)
                owner.append(i)
        with _progress("rolling log-likelihood", len(windows), disable_tqdm) as advance:
            scored = continuation_logprobs(self.model, windows, self.max_length, self.batch_size, self._device,
                                           self.precision, advance)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scored):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from micro_arch.eval.generate_until import generate_until

        with _progress("generation", len(requests), disable_tqdm) as advance:
            return generate_until(self, [req.args for req in requests], advance)


class _progress:
    """A rich progress bar with throughput and ETA, or nothing when lm-eval asks for quiet."""

    def __init__(self, what: str, total: int, quiet: bool):
        self.what, self.total, self.quiet = what, total, quiet or total == 0

    def __enter__(self):
        if self.quiet:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        rate = TextColumn("{task.fields[rate]}")
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), rate,
                            TimeRemainingColumn(), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.what, total=self.total, rate="")

        def advance(n: int) -> None:
            self.bar.advance(task, n)
            speed = self.bar.tasks[0].speed
            self.bar.update(task, rate=f"{speed:,.0f} requests/s" if speed else "")

        return advance

    def __exit__(self, *exc):
        if not self.quiet:
            self.bar.stop()
        return False
