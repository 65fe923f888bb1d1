"""lm-eval's generate_until requests for a micro-arch model: generation with the KV cache until a stop string.

Each request is (context, generation kwargs). The kwargs are read as lm-eval reads them for its `hf` model
(`until`, `max_gen_toks` and its aliases, `do_sample`, `temperature`, `top_k`, `top_p`), and the end-of-text
token's text joins the stop strings as there. The context keeps its last max_length - max_gen_toks tokens (at
least half the context: a small model's context may be shorter than max_gen_toks; past max_length the
generation slides, as micro_arch.eval.generate does). Requests with the same settings and the same prompt
length run as one batch (the cache has no padding masks), until every row holds a stop string or has
max_gen_toks new tokens. The text returned ends before the first stop string.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sampling_settings(kwargs: dict) -> dict:
    """temperature / top_k / top_p for micro_arch.eval.generate from normalised lm-eval kwargs (greedy unless
    do_sample)."""
    if not kwargs.get("do_sample"):
        return {"temperature": 0.0, "top_k": None, "top_p": None}
    top_k = kwargs.get("top_k")
    return {"temperature": float(kwargs.get("temperature") or 1.0), "top_k": int(top_k) if top_k else None,
            "top_p": float(kwargs["top_p"]) if kwargs.get("top_p") is not None else None}


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string ('' stops nothing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def generate_until(lm, requests: list[tuple[str, dict]], advance: Callable[[int], None] = lambda n: None
                   ) -> list[str]:
    """The generated text of each request, in order; `lm` is a MicroArchLM (model, text, sizes)."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    eos = lm.text.decode([lm.eot_token_id])
    groups: dict[tuple, list[int]] = {}
    prepared = []
    for i, (context, gen_kwargs) in enumerate(requests):
        kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), lm.max_gen_toks)
        until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos) if s]
        max_new = int(kwargs.pop("max_gen_toks"))
        keep = max(lm.max_length - max_new, lm.max_length // 2, 1)
        ids = lm.tok_encode(context)[-keep:] if context else [lm.eot_token_id]
        sampling = sampling_settings(kwargs)
        prepared.append((ids, until))
        key = (len(ids), max_new, tuple(until), tuple(sorted(sampling.items())))
        groups.setdefault(key, []).append(i)
    out: list[str | None] = [None] * len(requests)
    for (_, max_new, until, sampling), members in groups.items():
        for start in range(0, len(members), lm.batch_size):
            chunk = members[start:start + lm.batch_size]
            texts = _generate_batch(lm, [prepared[i][0] for i in chunk], max_new, list(until), dict(sampling))
            for i, text in zip(chunk, texts):
                out[i] = text
            advance(len(chunk))
    return out  # type: ignore[return-value]


def _generate_batch(lm, prompts: list[list[int]], max_new: int, until: list[str], sampling: dict) -> list[str]:
    """Prompts of one length, generated together until every row holds a stop string; texts cut there."""
    from micro_arch.eval.generate import continuation_text, generate

    length = len(prompts[0])

    def texts(rows: torch.Tensor) -> list[str]:
        return [continuation_text(lm.text, p, r) for p, r in zip(prompts, rows[:, length:].tolist())]

    def stopped(rows: torch.Tensor) -> bool:
        return all(any(s in t for s in until) for t in texts(rows))

    idx = torch.tensor(prompts, dtype=torch.long, device=lm.device)
    rows = generate(lm.model, idx, max_new, generator=lm.generator, vocab_limit=lm.text.vocab_size,
                    stop=stopped if until else None, **sampling)
    return [cut_at_stops(text, until) for text in texts(rows)]
