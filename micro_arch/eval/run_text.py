"""Text <-> token ids for a run as an evaluation harness sees it.

A pretrain run: its tokenizer, and the document boundary (the separator's first token, micro_arch.data.boundary)
as the end-of-text token. An SFT/DPO run (chat_template.json): the same base tokenizer, plus its chat tokens
matched where their text appears (as a transformers tokenizer matches special tokens), `<|end|>` as the
end-of-text token, and `render` to write a conversation in its template. Text the base tokenizer cannot
encode (a character outside a char vocabulary) is one line naming the characters.
"""

from __future__ import annotations

import re
from pathlib import Path

from micro_arch.errors import MicroArchError


class RunText:
    def __init__(self, run_dir, tokenizer):
        from micro_arch.data.boundary import boundary_token
        from micro_arch.data.chat_template import TEMPLATE_FILE, load_chat_tokenizer

        self.run_dir, self.base = Path(run_dir), tokenizer
        self.chat = load_chat_tokenizer(run_dir) if (self.run_dir / TEMPLATE_FILE).is_file() else None
        if self.chat is not None:
            self.vocab_size, self.end_id = self.chat.vocab_size, self.chat.end_id
            self._special = re.compile("(" + "|".join(re.escape(t) for t in self.chat.ids) + ")")
        else:
            self.vocab_size, self.end_id = tokenizer.vocab_size, boundary_token(tokenizer)

    def encode(self, text: str) -> list[int]:
        if self.chat is None:
            return self._base_encode(text)
        ids = []
        for i, piece in enumerate(self._special.split(text)):  # odd pieces are the chat tokens themselves
            ids += [self.chat.ids[piece]] if i % 2 else self._base_encode(piece) if piece else []
        return ids

    def _base_encode(self, text: str) -> list[int]:
        try:
            return list(self.base.encode(text))
        except (KeyError, ValueError) as err:
            raise MicroArchError(f"{self.run_dir}: the run's {self.base.name} tokenizer cannot encode a request's "
                                 f"text ({err}); this task's text is outside what the run was trained on") from None

    def decode(self, ids) -> str:
        return (self.chat or self.base).decode([int(i) for i in ids])

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """A conversation as text in the run's template; without add_generation_prompt the last message stays
        open, for the model to continue it."""
        if self.chat is None:
            raise MicroArchError(f"{self.run_dir}: not an SFT/DPO run (no chat_template.json), so it has no chat "
                                 "template; evaluate it without --apply-chat-template")
        parts = []
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if f"<|{role}|>" not in self.chat.ids:
                raise MicroArchError(f"a chat message has role {role!r}; the run's template has system, user and "
                                     "assistant")
            closed = add_generation_prompt or i < len(messages) - 1
            parts.append(f"<|{role}|>{msg.get('content', '')}" + ("<|end|>" if closed else ""))
        return "".join(parts) + ("<|assistant|>" if add_generation_prompt else "")
