"""Training stages (`train.stage`): pretraining, then SFT and DPO from model.init_from. Each is one Stage object
(micro_arch/stages/stage.py) that supplies its data, batches, loss, held-out measurement and memory shape; a
subclass registers itself under its name, and importing this package imports them all."""

from __future__ import annotations

from micro_arch.stages import dpo, pretrain, sft  # noqa: F401  (each registers its Stage)
from micro_arch.stages.stage import STAGES, Stage, stage_of
from micro_arch.train.step import StagePieces

__all__ = ["STAGES", "Stage", "StagePieces", "stage_of"]
