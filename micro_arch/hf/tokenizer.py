"""A run's tokenizer as a `tokenizers` model that transformers' AutoTokenizer loads, with the same ids.

- a Hugging Face folder's tokenizer (SFT/DPO from a folder): its own `tokenizers` model, unchanged (a chat
  run's tokens go after the model's rows: a padded embedding's spare rows get placeholder special tokens);
- char: a WordLevel vocabulary over single characters (every character its own pre-token), decoded by
  joining; a character outside the vocabulary is an error, as in micro-arch.
- SentencePiece BPE (what `tokenizer: bpe` trains: identity normalisation, no dummy prefix, byte fallback,
  digits split, '\\n' a user-defined piece): a BPE model with SentencePiece's pieces and merges ordered by
  score, spaces as '▁', byte fallback. `check_tokenizer` compares the ids with the run's own tokenizer.
"""

from __future__ import annotations

import math

from micro_arch.errors import MicroArchError


def _char_tokenizer(chars: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _sentencepiece_tokenizer(sp):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import generate_merges

    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = {p: sp.get_score(i) for i, p in enumerate(pieces)}
    vocab = {p: i for i, p in enumerate(pieces)}
    # SentencePiece gives user-defined pieces the score +0.0 and learned ones -0.0, -1, -2, ...
    special = [i for i in range(n) if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i)]
    user = [pieces[i] for i in range(n) if i not in special and scores[pieces[i]] == 0.0
            and math.copysign(1.0, scores[pieces[i]]) > 0]
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab, generate_merges(vocab, scores), unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in user])
    return tok


# The SFT/DPO chat template of micro_arch.stages: <|role|>content<|end|> per message, ids of the special
# tokens right after the base vocabulary.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def hf_tokenizer(tokenizer, special_tokens: list[str] | None = None, model_max_length: int | None = None):
    """A transformers fast tokenizer for a micro-arch CharTokenizer or SentencePieceTokenizer; special_tokens
    (a chat run's) get the ids right after the base vocabulary, and the chat template comes with them, its
    `<|end|>` the EOS. Without them, the document boundary (the separator's first token, '\n': what precedes
    every document in training, micro_arch.data.boundary) is both BOS and EOS, so tools that need one
    (lm-evaluation-harness's prefix token) have it; transformers then counts '\n' as a special token, so
    decode(..., skip_special_tokens=True) leaves newlines out. model_max_length: the model's context."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    if getattr(tokenizer, "name", None) == "char":
        tok = _char_tokenizer(tokenizer.chars)
    elif hasattr(tokenizer, "sp"):
        tok = _sentencepiece_tokenizer(tokenizer.sp)
    elif hasattr(tokenizer, "tok"):  # a Hugging Face folder's tokenizer (micro_arch.data.folder_tokenizer): as it was
        tok = Tokenizer.from_str(tokenizer.tok.to_str())
    else:
        raise MicroArchError(f"cannot export tokenizer {type(tokenizer).__name__}: only char, SentencePiece and a "
                             "Hugging Face folder's tokenizer map")
    extra = {}
    if special_tokens:
        gap = tokenizer.vocab_size - tok.get_vocab_size(with_added_tokens=True)
        if gap > 0:  # a padded embedding (a folder's tokenizer has fewer ids than rows): the chat tokens go after it
            tok.add_special_tokens([AddedToken(f"<|micro_arch_pad_{i}|>", special=True, normalized=False)
                                    for i in range(gap)])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
        ids = [tok.token_to_id(t) for t in special_tokens]
        if ids != list(range(tokenizer.vocab_size, tokenizer.vocab_size + len(special_tokens))):
            raise MicroArchError(f"the chat tokens {special_tokens} would get ids {ids}, not the ids after the "
                                 f"base vocabulary of {tokenizer.vocab_size}; nothing was exported")
        extra = {"chat_template": CHAT_TEMPLATE, "eos_token": special_tokens[-1]}
    elif not hasattr(tokenizer, "tok"):  # a folder's tokenizer keeps its own BOS/EOS (or none)
        extra = _boundary_as_bos_eos(tokenizer, tok)
    if model_max_length is not None:
        extra["model_max_length"] = int(model_max_length)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **extra)


def _boundary_as_bos_eos(tokenizer, tok) -> dict:
    """bos_token = eos_token = the document boundary's text, when it is one token of `tok` with the run's id."""
    from micro_arch.data.boundary import boundary_token

    try:
        boundary = boundary_token(tokenizer)
    except MicroArchError:
        return {}
    text = tok.id_to_token(boundary)
    if text is None or tok.token_to_id(text) != boundary or tok.encode(tokenizer.decode([boundary])).ids != [boundary]:
        return {}
    return {"bos_token": text, "eos_token": text}


def check_tokenizer(folder, tokenizer, text: str) -> None:
    """AutoTokenizer from `folder` must give the run's ids on `text` and decode them back to it."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ours = list(tokenizer.encode(text))
    theirs = loaded(text, add_special_tokens=False, verbose=False)["input_ids"]
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise MicroArchError(f"the exported tokenizer gives other ids than the run's from token {at} of the check "
                             f"text on ({ours[at:at + 5]} vs {theirs[at:at + 5]}); nothing was exported")
    if loaded.decode(theirs) != text:
        raise MicroArchError("the exported tokenizer does not decode the check text back to itself; nothing was "
                             "exported")
