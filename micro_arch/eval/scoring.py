"""Log-likelihoods of continuations for any micro-arch model, scored as lm-evaluation-harness's HF model
scores them (so the adapter in micro_arch.eval.harness gives its numbers; no lm_eval import here).

- A request is (context ids, continuation ids). The model sees (context + continuation) without its last
  token, cut on the left to the model's context (the continuation's own tokens are kept: a continuation
  longer than the context is refused); the continuation's log-probability is the sum over its tokens, and it
  is "greedy" when every one of them is the argmax.
- Requests run longest first in batches padded on the right: every model here is causal, so a real token
  never sees a pad, and no attention mask is needed. Requests with the same model input (multiple choice
  with one-token answers: the context and all but the last token agree) share one row.
- Rolling log-likelihood (perplexity of a whole text) splits the tokens into windows of the model's context
  that predict every token once; the first window's first token is predicted from `prefix` (the run's
  document boundary), each later window keeps one token of overlap as context, as lm-eval's windows do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from micro_arch.device import autocast
from micro_arch.errors import MicroArchError

Request = tuple[list[int], list[int]]


def model_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """What the model reads for a request: (context + continuation)[:-1], its last max_length tokens."""
    if not continuation:
        raise MicroArchError("a log-likelihood request needs at least one continuation token")
    if len(continuation) > max_length:
        raise MicroArchError(f"a continuation of {len(continuation)} tokens is longer than the model's context "
                             f"({max_length} tokens); it cannot be scored (a model with a longer model.max_seq_len can)")
    if not context:
        raise MicroArchError("a log-likelihood request needs at least one context token (an empty context is "
                             "given the document-boundary token by the caller)")
    return (context + continuation)[-(max_length + 1):][:-1]


@torch.no_grad()
def continuation_logprobs(model, requests: list[Request], max_length: int, batch_size: int, device="cpu",
                          precision: str = "fp32", progress: Callable[[int], None] | None = None
                          ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy) for each request, in the order given."""
    if batch_size < 1:
        raise MicroArchError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    inputs = [model_input(ctx, cont, max_length) for ctx, cont in requests]
    rows: dict[tuple[int, ...], list[int]] = {}  # one model row per distinct input, with the requests it serves
    for i, inp in enumerate(inputs):
        rows.setdefault(tuple(inp), []).append(i)
    order = sorted(rows, key=len, reverse=True)  # longest first: the first batch is the largest
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(batch[0])
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for r, inp in enumerate(batch):
            idx[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        with autocast(device, precision):
            logits = model(idx.to(device)).logits
        for r, inp in enumerate(batch):
            served = rows[inp]
            needed = max(len(requests[i][1]) for i in served)  # log-softmax only where continuations are scored
            logprobs = F.log_softmax(logits[r, len(inp) - needed:len(inp)].float(), dim=-1)
            for i in served:
                cont = requests[i][1]
                scored = logprobs[needed - len(cont):]
                target = torch.tensor(cont, device=scored.device)
                total = float(scored.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((scored.argmax(-1) == target).all()))
        if progress is not None:
            progress(sum(len(rows[inp]) for inp in batch))
    return results  # type: ignore[return-value]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[Request]:
    """(context, continuation) windows that predict each of `tokens` exactly once, each with as much context
    as the model's length allows: the first from `prefix`, each later one from the tokens before it."""
    if max_length < 1:
        raise MicroArchError(f"the context must be at least one token, got {max_length}")
    windows, done = [], 0
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        seen = [prefix] + tokens[:end]  # the input of a window is the max_length tokens before its last target
        inputs = seen[max(0, end - max_length):end]
        n_pred = end - done
        windows.append((inputs[:len(inputs) - n_pred + 1], tokens[done:end]))
        done = end
    return windows


def rolling_logprob(model, tokens: list[int], prefix: int, max_length: int, batch_size: int, device="cpu",
                    precision: str = "fp32") -> float:
    """log p(tokens) given the document boundary `prefix`, over rolling_windows."""
    if not tokens:
        return 0.0
    scored = continuation_logprobs(model, rolling_windows(tokens, prefix, max_length), max_length, batch_size,
                                   device, precision)
    return sum(total for total, _ in scored)
