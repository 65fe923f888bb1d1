"""Sampling from a model: KV/recurrent cache, temperature, top-k and nucleus (top-p) filtering.

With the cache, the prompt runs once (prefill) and every later call feeds one token. A model only
knows positions below model.cfg.max_seq_len, so once the sequence would outgrow it, generation
falls back to nanoGPT's sliding crop: each step recomputes the last max_seq_len tokens without a
cache (their positions restart at 0, so this is an approximation the model was never trained on,
and it is slower; raise model.max_seq_len to avoid it).
"""

from __future__ import annotations

import torch

from micro_arch.errors import MicroArchError
from micro_arch.model.state import BlockState


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits outside the k largest of each row set to -inf (ties at the k-th value are kept)."""
    k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least top_p (the nucleus)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(-1) - probs  # a token stays if the more likely ones fall short of top_p
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch, 1) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    try:
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
    except RuntimeError as err:
        if "inf" not in str(err) and "nan" not in str(err):
            raise
        raise MicroArchError("the model's next-token probabilities are not finite (NaN or inf): its weights or a "
                             "block's output diverged, so there is nothing to sample; see the run's summary.json "
                             "and train it again with the setting fixed") from None


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise MicroArchError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if temperature < 0:
        raise MicroArchError(f"temperature must be at least 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise MicroArchError(f"top_k must be at least 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MicroArchError(f"top_p must be in (0, 1] (or unset), got {top_p}")


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
             vocab_limit: int | None = None, stop=None) -> torch.Tensor:
    """Extend idx (batch, T) by max_new_tokens sampled tokens; returns (batch, T + max_new_tokens).

    vocab_limit: sample only ids below it (a model may have a larger vocabulary than its tokenizer).
    stop: called with idx after each new token; when it returns True, generation ends early (e.g. every row
    has reached a stop string), so the result may be shorter.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if idx.size(1) == 0:
        raise MicroArchError("generate needs at least one prompt token")
    max_len = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        state = None  # a BlockState with a cache while the sequence fits into max_seq_len
        for _ in range(max_new_tokens):
            if state is None and use_cache and idx.size(1) <= max_len:
                state = BlockState(cache={})
                logits = model(idx, state=state, last_only=True).logits
            elif state is not None and idx.size(1) <= max_len:
                position = idx.size(1) - 1  # of the newest token: Model.forward starts at state.offset
                state.positions = torch.tensor([position], device=idx.device)
                state.aux_losses.clear()
                logits = model(idx[:, -1:], state=state, last_only=True).logits
            else:
                state = None
                logits = model(idx[:, -max_len:], last_only=True).logits
            logits = logits[:, -1]
            if vocab_limit is not None and vocab_limit < logits.size(-1):
                logits = logits[:, :vocab_limit]
            idx = torch.cat([idx, next_token(logits, temperature, top_k, top_p, generator)], dim=1)
            if stop is not None and stop(idx):
                break
        return idx
    finally:
        model.train(was_training)


def generate_from_prompts(model, prompts: list[list[int]], max_new_tokens: int, num_samples: int = 1,
                          generator: torch.Generator | None = None, **sampling) -> list[list[int]]:
    """New tokens for each prompt (token ids), num_samples each, prompt-major.

    Prompts of one length run as one batch (its num_samples copies included): prompts of different
    lengths cannot share a cache step without padding masks.
    """
    if num_samples < 1:
        raise MicroArchError(f"num_samples must be at least 1, got {num_samples}")
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    results: list[list[int] | None] = [None] * (len(prompts) * num_samples)
    for length, members in by_length.items():
        rows = [prompts[i] for i in members for _ in range(num_samples)]
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        out = generate(model, idx, max_new_tokens, generator=generator, **sampling)[:, length:].tolist()
        for row, new in enumerate(out):
            prompt_index, sample = members[row // num_samples], row % num_samples
            results[prompt_index * num_samples + sample] = new
    return results


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from '\\n' (or token 0 where '\\n' cannot be encoded)."""
    try:
        ids = tokenizer.encode(prompt or "\n")
    except (KeyError, ValueError) as err:
        if not prompt:
            return [0]
        raise MicroArchError(f"prompt {prompt!r} cannot be encoded by the run's tokenizer ({err})") from None
    if not ids and prompt:
        raise MicroArchError(f"prompt {prompt!r} encodes to no tokens")
    return ids or [0]


def continuation_text(tokenizer, prompt_ids: list[int], new: list[int]) -> str:
    # Decoding prompt and continuation together keeps what joins them (e.g. SentencePiece's word spaces).
    whole, head = tokenizer.decode(prompt_ids + new), tokenizer.decode(prompt_ids)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new)


def sample_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 200, top_p: float | None = None, seed: int = 0,
                 num_samples: int = 1) -> list[str]:
    """Continuations (without their prompts) of each prompt, num_samples each, prompt-major."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    new = generate_from_prompts(model, encoded, max_new_tokens, num_samples, generator=generator,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                vocab_limit=tokenizer.vocab_size)
    prompt_of = [ids if p else [] for p, ids in zip(prompts, encoded) for _ in range(num_samples)]
    return [continuation_text(tokenizer, ids, tokens) for ids, tokens in zip(prompt_of, new)]


def sample_from_run(run_dir, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.8,
                    top_k: int | None = 200, seed: int = 0, top_p: float | None = None, num_samples: int = 1,
                    checkpoint=None, device: str = "auto") -> list[str]:
    from micro_arch.device import resolve_device
    from micro_arch.rundir import load_run

    _, model, tokenizer = load_run(run_dir, checkpoint, resolve_device(device, option="--device"))
    return sample_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, num_samples=num_samples)
