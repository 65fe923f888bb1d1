"""`micro-arch chat RUN_DIR`: multi-turn chat with an SFT or DPO run, through its chat template.

The conversation stays in the model's KV cache between turns: each turn feeds only its new tokens (the user
turn and <|assistant|>), then samples the reply a token at a time until <|end|>. When the conversation would
outgrow model.max_seq_len, the oldest exchanges are dropped (the system turn is kept) and the cache is
rebuilt from what remains.
"""

from __future__ import annotations

import torch

from micro_arch.data.chat_template import ChatTokenizer, render
from micro_arch.errors import MicroArchError
from micro_arch.eval.generate import _check_sampling, next_token
from micro_arch.model.state import BlockState


class ChatSession:
    def __init__(self, model, tok: ChatTokenizer, system: str | None = None, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = None, max_new_tokens: int = 200, seed: int = 0):
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        if model.cfg.vocab_size < tok.vocab_size:
            raise MicroArchError(f"the model's vocabulary ({model.cfg.vocab_size}) has no room for the chat "
                                 f"template's tokens ({tok.vocab_size}); chat with an SFT or DPO run")
        self.model, self.tok = model.eval(), tok
        self.device = next(model.parameters()).device
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.max_new_tokens = max_new_tokens
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.messages = [{"role": "system", "content": system}] if system else []
        self.state, self.fed = None, []  # the cache, and the token ids it holds
        # a reply may use the base vocabulary and <|end|>; never a role token (nor the model's spare rows)
        self.allowed = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.allowed[: tok.base_vocab_size] = True
        self.allowed[tok.end_id] = True

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the model after what the cache holds; the last position's logits."""
        if self.state is None:
            self.state, self.fed = BlockState(cache={}), []
        self.state.positions = torch.tensor([len(self.fed)], device=self.device)
        self.state.aux_losses.clear()
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(x, state=self.state, last_only=True).logits[0, -1]
        self.fed += ids
        return logits

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        ids, _ = render(self.tok, messages, add_generation_prompt=True)
        return ids.tolist()

    def _fit(self) -> tuple[list[int], int]:
        """(the prompt ids, the reply's budget in tokens). The oldest exchanges are dropped until a reply of
        max_new_tokens and its closing <|end|> fit in model.max_seq_len; when the newest message alone leaves
        less, the reply gets the room that is left. Resets the cache if the conversation no longer continues
        what it holds. A message too long for any reply changes nothing."""
        size = self.model.cfg.max_seq_len
        messages = list(self.messages)
        ids = self._prompt_ids(messages)
        while len(ids) + self.max_new_tokens + 1 > size:
            first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
            later_user = [i for i, m in enumerate(messages) if m["role"] == "user" and i > (first or 0)]
            if first is None or not later_user:
                break
            del messages[first:later_user[0]]
            ids = self._prompt_ids(messages)
        room = size - len(ids) - 1  # the reply's tokens and its <|end|> are fed after the prompt
        if room < 1:
            raise MicroArchError(f"the message is too long: the conversation is {len(ids)} tokens with it, and "
                                 f"model.max_seq_len={size} leaves no room for a reply; shorten it")
        self.messages = messages
        if self.state is not None and ids[: len(self.fed)] != self.fed:
            self.state = None
        return ids, min(self.max_new_tokens, room)

    @torch.no_grad()
    def reply(self, text: str, on_text=None) -> str:
        """Add a user turn, sample the assistant's reply (calling on_text(new_text) as it grows), keep both."""
        try:
            self.tok.encode(text)
        except ValueError as err:
            raise MicroArchError(f"the message cannot be encoded by the run's tokenizer ({err})") from None
        self.messages.append({"role": "user", "content": text})
        try:
            ids, budget = self._fit()
        except MicroArchError:
            self.messages.pop()
            raise
        logits = self._feed(ids[len(self.fed) if self.state is not None else 0:])
        answer, shown = [], ""
        for _ in range(budget):
            logits = logits.masked_fill(~self.allowed, float("-inf"))
            token = int(next_token(logits[None], generator=self.generator, **self.sampling)[0, 0])
            if token == self.tok.end_id:
                break
            answer.append(token)
            text_now = self.tok.base.decode(answer)
            if on_text is not None and text_now.startswith(shown):
                on_text(text_now[len(shown):])
                shown = text_now
            logits = self._feed([token])
        self._feed([self.tok.end_id])  # the closing token the template puts after every turn
        content = self.tok.base.decode(answer)
        self.messages.append({"role": "assistant", "content": content})
        return content
