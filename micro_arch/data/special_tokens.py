"""The chat template's special tokens, appended after any tokenizer's own ids (see chat_template)."""

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
