"""From an experiment folder to a model: config (with the experiment's own blocks loaded) and vocabulary."""

from __future__ import annotations

from pathlib import Path

from micro_arch.config import ExperimentConfig, blame, experiment_path, extends_chain, load_config
from micro_arch.errors import MicroArchError
from micro_arch.model.check import check_blocks
from micro_arch.model.model import Model
from micro_arch.model.registry import load_experiment_blocks


def load_experiment(target: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load `<experiment>/blocks.py` (if any) first, and those of the experiments it extends, so their block
    names resolve; then the config, and check what no single key can: the sections together, and every block
    (built on the meta device, its output shape checked). An error names the `--set` override or the file of
    the `extends` chain that set the key."""
    path = experiment_path(target)
    load_blocks_of(path)
    cfg = load_config(path, overrides)
    try:
        check_consistency(cfg)
        check_blocks(cfg.model)
    except MicroArchError as err:
        raise blame(err, overrides, path) from None
    return cfg


def load_blocks_of(config_file: Path) -> None:
    """The blocks.py of an experiment and of the experiments it extends (a run folder: its kept copies)."""
    for path in extends_chain(config_file):
        load_experiment_blocks(path.parent)


def check_consistency(cfg: ExperimentConfig) -> None:
    """Checks across sections that no single section can make."""
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise MicroArchError(f"train.seq_len={cfg.train.seq_len} is longer than model.max_seq_len="
                             f"{cfg.model.max_seq_len}; lower train.seq_len or raise model.max_seq_len",
                             where=("train.seq_len", "model.max_seq_len"))


def with_vocab(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fill model.vocab_size from the tokenizer when the config leaves it to the data."""
    if cfg.model.vocab_size is None:
        from micro_arch.data import prepare_data

        cfg.model.vocab_size = prepare_data(cfg.data).tokenizer.vocab_size
    return cfg


def build_model(cfg: ExperimentConfig) -> Model:
    return Model(with_vocab(cfg).model)
