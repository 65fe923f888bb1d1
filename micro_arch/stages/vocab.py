"""Which data an experiment reads, and the vocabulary a stage experiment's model has, for commands that look
at an experiment without training it (trace, prepare).

A stage experiment (sft, dpo) reads records, not text, and its model has model.init_from's vocabulary plus the
chat template's tokens. Without init_from (a shipped stage experiment names its parent on the command line),
the vocabulary is that of the nearest pretraining experiment it extends, plus the template's tokens.
"""

from __future__ import annotations

from pathlib import Path

from micro_arch.errors import MicroArchError


def reads_records(cfg) -> bool:
    """Conversations or preference pairs (sft, dpo), rather than text to pretrain on."""
    from micro_arch.stages.stage import stage_of

    return stage_of(cfg).is_chat


def stage_vocab_size(cfg, config_file: Path | None) -> int:
    from micro_arch.data.special_tokens import SPECIAL_TOKENS

    if cfg.model.init_from:
        from micro_arch.stages.setup import stage_tokenizer

        return stage_tokenizer(cfg).vocab_size
    from micro_arch.config import extends_chain, load_config
    from micro_arch.data import prepare_data

    for path in reversed(extends_chain(config_file) if config_file else []):
        parent = load_config(path)
        if not reads_records(parent):
            return prepare_data(parent.data).tokenizer.vocab_size + len(SPECIAL_TOKENS)
    raise MicroArchError(f"train.stage={cfg.train.stage}: set model.init_from (the run to fine-tune) or "
                         "model.vocab_size, so the model's vocabulary is known")
