"""Using a trained run: held-out evaluation, perplexity on any text, generation, chat, context extension."""
