"""A CORE-style aggregate of downstream accuracies (DCLM's CORE, as nanochat computes it).

Each task's accuracy is centered on chance, (accuracy - chance) / (1 - chance): 0 is guessing, 1 is perfect,
so tasks with 2 and with 4 choices weigh alike. Chance is 1 / (number of choices), averaged over the
documents scored (a multiple-choice task whose questions have different numbers of choices gets their mean);
tasks scored by exact match or by a greedy continuation have chance 0. The aggregate is the mean over the
tasks, its standard error from lm-eval's per-task standard errors (tasks independent):
sqrt(sum se_i^2) / n, each se_i scaled by 1 / (1 - chance) as its accuracy is.
"""

from __future__ import annotations

import math


def centered(accuracy: float, chance: float) -> float:
    if not 0 <= chance < 1:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return (accuracy - chance) / (1 - chance)


def chance_of(choice_counts: list[int]) -> float:
    """Expected accuracy of guessing uniformly among each document's choices."""
    counts = [n for n in choice_counts if n > 0]
    return sum(1 / n for n in counts) / len(counts) if counts else 0.0


def aggregate(scores: dict[str, dict]) -> dict:
    """{'centered', 'stderr', 'n_tasks', 'tasks'} over the tasks with an accuracy; stderr None when a task has
    none (a single document)."""
    used = {name: s for name, s in scores.items() if s.get("centered") is not None}
    if not used:
        return {"centered": None, "stderr": None, "n_tasks": 0, "tasks": []}
    n = len(used)
    errors = [s.get("centered_stderr") for s in used.values()]
    stderr = None if any(e is None for e in errors) else math.sqrt(sum(e * e for e in errors)) / n
    return {"centered": sum(s["centered"] for s in used.values()) / n, "stderr": stderr, "n_tasks": n,
            "tasks": sorted(used)}
