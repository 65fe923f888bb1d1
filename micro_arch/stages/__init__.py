"""Training stages (`train.stage`): pretraining, then SFT and DPO from model.init_from. Each is one Stage object
(micro_arch/stages/stage.py) that supplies its data, batches, loss, held-out measurement and memory shape."""

from __future__ import annotations

from micro_arch.stages.dpo import DPO
from micro_arch.stages.pretrain import Pretrain
from micro_arch.stages.sft import SFT
from micro_arch.stages.stage import Stage
from micro_arch.train.step import StagePieces

STAGES: dict[str, Stage] = {stage.name: stage for stage in (Pretrain(), SFT(), DPO())}


def stage_of(cfg) -> Stage:
    """The Stage object of an experiment config (or of its train section)."""
    train = getattr(cfg, "train", cfg)
    return STAGES[train.stage]


__all__ = ["STAGES", "Stage", "StagePieces", "stage_of"]
