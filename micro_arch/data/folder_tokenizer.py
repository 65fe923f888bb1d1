"""A local Hugging Face folder's tokenizer behind micro-arch's tokenizer interface, for SFT and DPO from it.

    base = folder_tokenizer(folder, model_vocab_size)   # encode, decode, vocab_size, identity, save
    ChatTokenizer(base)                                 # the chat template's tokens after the model's rows

The folder's fast tokenizer (its `tokenizers` model, as transformers' AutoTokenizer loads it: tokenizer.json,
or tokenizer.model / vocab.json converted) encodes content without the tokenizer's own special tokens
(no BOS), so the chat template alone frames a conversation. vocab_size is the model's embedding rows, which
may exceed the tokenizer's ids (padded vocabularies): the template's tokens come after every row (or are the
last rows already, in a folder exported from an SFT/DPO run). A run keeps
it as hf_tokenizer.json beside the usual tokenizer.json, so the run directory alone rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from micro_arch.data.files import write_atomically
from micro_arch.errors import MicroArchError

RUN_FILE = "hf_tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class FolderTokenizer:
    def __init__(self, tok, vocab_size: int, name: str):
        self.tok, self.vocab_size, self.name = tok, vocab_size, name
        self._text = tok.to_str()

    @property
    def identity(self) -> str:
        return f"huggingface:{self.vocab_size}:" + hashlib.sha256(self._text.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except Exception as err:  # tokenizers raises a bare Exception for text its model cannot cover
            raise ValueError(str(err)) from None

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, run_dir) -> None:
        run_dir = Path(run_dir)
        write_atomically(run_dir / RUN_FILE, self._text.encode())
        meta = {"type": "huggingface", "name": self.name, "file": RUN_FILE, "vocab_size": self.vocab_size}
        write_atomically(run_dir / "tokenizer.json", json.dumps(meta).encode())

    @classmethod
    def load(cls, run_dir, meta: dict) -> FolderTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(run_dir) / meta["file"])), meta["vocab_size"], meta["name"])


def folder_tokenizer(folder, model_vocab_size: int, why: str) -> FolderTokenizer:
    """The fast tokenizer of a local transformers folder; `why` (e.g. 'train.stage=sft') says who needs it in
    the one-line error when the folder has none that can be used."""
    from micro_arch.offline import offline

    folder = Path(folder)
    fix = ("save the model's tokenizer beside its weights (tokenizer.save_pretrained(folder)), or start from a "
           "micro-arch run directory")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise MicroArchError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {why} needs the "
                             f"model's tokenizer: {fix}")
    offline()
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises many types for a broken or partial tokenizer
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MicroArchError(f"{folder}: its tokenizer files do not load ({first}); {why} needs the model's "
                             f"tokenizer: {fix}") from None
    if not getattr(loaded, "is_fast", False):
        raise MicroArchError(f"{folder}: only a slow {type(loaded).__name__} loads from it; {why} needs a fast "
                             "tokenizer (tokenizer.json): save one with transformers' tokenizer.save_pretrained")
    tok = loaded.backend_tokenizer
    if tok.get_vocab_size(with_added_tokens=True) > model_vocab_size:
        raise MicroArchError(f"{folder}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids but the "
                             f"model only {model_vocab_size} embedding rows; the folder's tokenizer is not the model's")
    return FolderTokenizer(tok, model_vocab_size - _chat_rows(tok, model_vocab_size), f"huggingface-{folder.name}")


def _chat_rows(tok, rows: int) -> int:
    """How many of the last rows are already the chat template's tokens (a folder exported from an SFT/DPO run):
    the template then reuses them instead of adding them again."""
    from micro_arch.data.special_tokens import SPECIAL_TOKENS

    n = len(SPECIAL_TOKENS)
    return n if [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(rows - n, rows)) else 0
