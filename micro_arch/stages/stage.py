"""The Stage contract: everything that differs between `train.stage: pretrain | sft | dpo`, in one object.

    stage = stage_of(cfg)                                # micro_arch.stages: the object for cfg.train.stage
    data = stage.prepare_data(cfg)                       # token windows, conversations or preference pairs
    pieces = stage.pieces(cfg, data, device, rank, world_size, resume)   # batch source, loss, held-out
    stage.synthetic_batch(cfg, device)                   # a batch of the source's form, for the memory estimate

StagePieces (micro_arch.train.step) is what the trainer consumes. A fourth stage is one new file: a subclass with its name, registered in micro_arch/stages/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from micro_arch.train.step import StagePieces

STAGES: dict[str, Stage] = {}  # train.stage -> its object; each subclass registers itself by its name


def stage_of(cfg) -> Stage:
    """The Stage object of an experiment config (or of its train section)."""
    train = getattr(cfg, "train", cfg)
    return STAGES[train.stage]


class Stage:
    name: str = ""
    is_chat: bool = False  # its runs answer as the assistant of the chat template (samples, eval, chat)
    rows_per_example: int = 1  # model rows per training example (DPO: a chosen and a rejected row)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        STAGES[cls.name] = cls()

    def prepare_data(self, cfg):
        raise NotImplementedError

    def pieces(self, cfg, data, device: torch.device, rank: int = 0, world_size: int = 1,
               resume=None) -> StagePieces:
        raise NotImplementedError

    def loss_fn(self, train, reference=None) -> Callable:
        raise NotImplementedError

    def synthetic_batch(self, cfg, device: torch.device) -> tuple:
        """Random tokens in the form the stage's batch source yields, at full width (a source trims a batch after
        its last learned position; every target here is learned, the widest case)."""
        raise NotImplementedError

    def keeps_reference(self, train) -> bool:
        """Whether training holds a frozen copy of the starting weights beside the model (memory counts it)."""
        return False
