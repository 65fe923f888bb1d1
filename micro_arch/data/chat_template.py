"""The chat template: conversations <-> token ids, with special tokens appended to any tokenizer.

A conversation renders as, for each message, `<|role|> content <|end|>`:

    <|system|>PERSONS: VIOLA, CAPTAIN.<|end|><|user|>What country, friends, is this?<|end|><|assistant|>...<|end|>

The special tokens get the ids right after the base tokenizer's vocabulary (char or SentencePiece), so the
base ids keep their meaning and a pretrained embedding only grows by len(SPECIAL_TOKENS) rows. Content is
encoded by the base tokenizer alone: text that happens to spell "<|end|>" is plain characters, never a
control token. Training targets are the assistant's content and its closing <|end|> (so the model learns
to stop); every other position gets the target -1, which the model's cross-entropy ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from micro_arch.data.files import write_atomically
from micro_arch.data.special_tokens import SPECIAL_TOKENS
from micro_arch.errors import MicroArchError

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.json"


class ChatTokenizer:
    """A base tokenizer plus the template's special tokens (ids base.vocab_size, base.vocab_size + 1, ...)."""

    def __init__(self, base):
        self.base = base
        self.base_vocab_size = base.vocab_size
        self.ids = {tok: base.vocab_size + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.role_id = {role: self.ids[f"<|{role}|>"] for role in ROLES}
        self.end_id = self.ids["<|end|>"]
        self.vocab_size = base.vocab_size + len(SPECIAL_TOKENS)
        self.name = f"{base.name}+chat"

    @property
    def identity(self) -> str:
        return f"{self.base.identity}+chat:{','.join(SPECIAL_TOKENS)}"

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids) -> str:
        """Base ids decoded in runs (so SentencePiece keeps its spaces), special ids as their text."""
        names = {i: tok for tok, i in self.ids.items()}
        out, run = [], []
        for i in (int(i) for i in ids):
            if i in names:
                out.append(self.base.decode(run) if run else "")
                out.append(names[i])
                run = []
            else:
                run.append(i)
        out.append(self.base.decode(run) if run else "")
        return "".join(out)

    def save(self, run_dir) -> None:
        """The base tokenizer as every run keeps it, and the template beside it."""
        self.base.save(run_dir)
        data = {"special_tokens": list(SPECIAL_TOKENS), "base_vocab_size": self.base_vocab_size}
        write_atomically(Path(run_dir) / TEMPLATE_FILE, json.dumps(data).encode())


def load_chat_tokenizer(run_dir) -> ChatTokenizer:
    """The chat tokenizer of an SFT or DPO run; a clear error for a run trained without the template."""
    from micro_arch.data.tokenizers import load_tokenizer

    run_dir = Path(run_dir)
    path = run_dir / TEMPLATE_FILE
    if not path.is_file():
        raise MicroArchError(f"{run_dir}: no {TEMPLATE_FILE}; this run was not trained with the chat template. "
                             "Chat with a run of train.stage: sft or dpo (e.g. experiments/shakespeare-sft)")
    meta = json.loads(path.read_text())
    chat = ChatTokenizer(load_tokenizer(run_dir))
    if meta.get("special_tokens") != list(SPECIAL_TOKENS) or meta.get("base_vocab_size") != chat.base_vocab_size:
        raise MicroArchError(f"{path}: special tokens {meta.get('special_tokens')} after a vocabulary of "
                             f"{meta.get('base_vocab_size')}, but this micro-arch uses {list(SPECIAL_TOKENS)} after "
                             f"{chat.base_vocab_size}; the run was written by another version")
    return chat


def check_messages(messages, where: str) -> list[dict]:
    """The messages of one conversation, validated: a list of {role, content} with known roles, non-empty
    assistant turns, and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise MicroArchError(f"{where}: no 'messages' list; each line should look like "
                             '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}')
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise MicroArchError(f"{where}: message {i} should be a mapping with 'role' and 'content', got {msg!r}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise MicroArchError(f"{where}: message {i} has unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise MicroArchError(f"{where}: message {i} ({role}) content should be a string, got {content!r}")
        if role == "assistant" and not content.strip():
            raise MicroArchError(f"{where}: message {i} is an empty assistant turn; every assistant turn needs "
                                 "text to learn from (drop the conversation or the turn)")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise MicroArchError(f"{where}: no assistant turn, so nothing to learn from; end the conversation with "
                             'a {"role": "assistant", "content": "..."} message')
    return out


def render(tok: ChatTokenizer, messages: list[dict], add_generation_prompt: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, trainable) for a conversation: trainable[i] is True where ids[i] is assistant content or the
    <|end|> closing an assistant turn. add_generation_prompt appends <|assistant|> for the model to answer.
    Raises ValueError when the base tokenizer cannot encode a message."""
    ids, trainable = [], []
    for msg in messages:
        content = tok.encode(msg["content"]) if msg["content"] else []
        learn = msg["role"] == "assistant"
        ids += [tok.role_id[msg["role"]], *content, tok.end_id]
        trainable += [False] + [learn] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tok.role_id["assistant"])
        trainable.append(False)
    return np.asarray(ids, dtype=np.int64), np.asarray(trainable, dtype=bool)


def parse(tok: ChatTokenizer, ids) -> list[dict]:
    """The inverse of render: token ids -> messages (a final turn without <|end|> is kept as it is)."""
    by_id = {i: role for role, i in tok.role_id.items()}
    messages, role, content = [], None, []
    for i in (int(i) for i in ids):
        if i in by_id:
            if role is not None:
                raise ValueError(f"<|{by_id[i]}|> inside an open {role} turn")
            role, content = by_id[i], []
        elif i == tok.end_id:
            if role is None:
                raise ValueError("<|end|> outside a turn")
            messages.append({"role": role, "content": tok.base.decode(content)})
            role = None
        elif role is None:
            raise ValueError(f"token {i} outside a turn")
        else:
            content.append(i)
    if role is not None:
        messages.append({"role": role, "content": tok.base.decode(content)})
    return messages


def inputs_and_targets(ids: np.ndarray, trainable: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets of one conversation, cut to seq_len and padded after its end:
    inputs with 0, targets with -1, and -1 wherever the next token is not trainable."""
    ids, trainable = ids[: seq_len + 1], trainable[: seq_len + 1]
    x = np.zeros(seq_len, dtype=np.int64)
    y = np.full(seq_len, -1, dtype=np.int64)
    n = len(ids) - 1
    x[:n] = ids[:-1]
    y[:n] = np.where(trainable[1:], ids[1:], -1)
    return x, y
