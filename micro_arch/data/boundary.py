"""The token that stands for "a document starts here": the first token of the corpus separator.

Runs are trained on documents joined by SEPARATOR ("\\n\\n"), so the token before every document's first token
is a "\\n" token. That is what lm-evaluation-harness needs as a BOS/EOS: the context of a request with an empty
context and of the first window of a rolling log-likelihood. The export names it bos_token and eos_token, and
the lm-eval adapter uses the same id, so both score a request alike.
"""

from __future__ import annotations

from micro_arch.data.corpus import SEPARATOR
from micro_arch.errors import MicroArchError


def boundary_token(tokenizer) -> int:
    """The id of the separator's first token under `tokenizer` (char and SentencePiece: '\\n')."""
    try:
        ids = tokenizer.encode(SEPARATOR)
    except (KeyError, ValueError):
        ids = []
    if not ids:
        raise MicroArchError(f"the run's tokenizer cannot encode the document separator {SEPARATOR!r}, so it has no "
                             "token to stand for the start of a document")
    return int(ids[0])
