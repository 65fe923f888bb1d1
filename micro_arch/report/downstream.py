"""Downstream task scores in a compare report: rows per setting, and a verdict only within one setting.

Each run's downstream.json (micro-arch eval --tasks) holds evaluations keyed by their setting: tasks, shots,
limit and chat template. Runs are compared on a setting only when at least two of them were evaluated on
it; a run evaluated on other settings only gets "—" and a note. The verdict on a setting is on its CORE-style
mean of centered accuracies: the best run is named only when its lead over the next exceeds NOISE_SIGMAS
standard errors of the difference (lm-eval's per-task errors, propagated), as the held-out rows are judged.
"""

from __future__ import annotations

import json
import math

from micro_arch.eval.downstream import read_evaluations, setting_of, setting_text
from micro_arch.report.fairness import NOISE_SIGMAS


def _key(evaluation: dict) -> str:
    setting = setting_of(evaluation["tasks"], evaluation["num_fewshot"], evaluation["limit"],
                         evaluation.get("chat_template", False))
    return json.dumps(setting, sort_keys=True)


def _cell(value, stderr) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def shared_settings(runs) -> dict[str, dict[str, dict]]:
    """setting key -> run label -> evaluation, for settings at least two runs were evaluated on."""
    by_setting: dict[str, dict[str, dict]] = {}
    for run in runs:
        try:
            evaluations = read_evaluations(run.path)
        except Exception as err:  # a damaged file is a note, not the end of the report
            run.notes.append(f"{run.label}: downstream.json left out ({err})")
            continue
        for evaluation in evaluations:
            by_setting.setdefault(_key(evaluation), {})[run.label] = evaluation
    return {k: v for k, v in by_setting.items() if len(v) >= 2}


def verdict(name: str, evaluations: dict[str, dict]) -> tuple[str, str | None]:
    """(the line, the best run's label or None) on the CORE-style mean of one setting."""
    ranked = sorted(((e["core"]["centered"], e["core"]["stderr"], label) for label, e in evaluations.items()
                     if e["core"]["centered"] is not None), reverse=True)
    if len(ranked) < 2:
        return f"{name}: fewer than two runs have a centered accuracy; nothing ranked.", None
    (best, se_best, label), (second, se_second, other) = ranked[0], ranked[1]
    if se_best is None or se_second is None:
        return f"{name}: no standard errors (one document per task?), so no winner.", None
    margin = NOISE_SIGMAS * math.hypot(se_best, se_second)
    if best - second > margin:
        return (f"{name}: {label} is best (CORE {best:.3f} vs {other}'s {second:.3f}, a lead beyond "
                f"{NOISE_SIGMAS:g} standard errors, {margin:.3f}).", label)
    tied = [lab for c, se, lab in ranked if se is not None and best - c <= NOISE_SIGMAS * math.hypot(se_best, se)]
    return f"{name}: within noise between {', '.join(tied)} (CORE {best:.3f} at best), no winner.", None


def add_downstream(report, runs) -> None:
    """Rows, footnotes, notes and verdicts for every shared setting, added to a compare Report."""
    import pandas as pd

    shared = shared_settings(runs)
    if not shared:
        return
    labels = [r.label for r in runs]
    rows, versions = [], set()
    for n, (_, evaluations) in enumerate(sorted(shared.items()), 1):
        name = f"downstream [{n}]"
        first = next(iter(evaluations.values()))
        report.footnotes.append(f"[{n}] downstream tasks: {setting_text(first)} (micro-arch eval --tasks; "
                                "centered = (accuracy - chance) / (1 - chance), CORE = its mean over the tasks)")
        line, best = verdict(name, evaluations)
        report.best.append(line)
        core_row = len(report.table) + len(rows)
        rows.append({"metric": f"{name} CORE (centered)",
                     **{lab: _cell(evaluations[lab]["core"]["centered"], evaluations[lab]["core"]["stderr"])
                        if lab in evaluations else "—" for lab in labels}})
        for task in sorted(first["scores"]):  # the tasks scored: a group's (e.g. mmlu) subtasks
            rows.append({"metric": f"{name} {task} accuracy",
                         **{lab: _cell(evaluations[lab]["scores"].get(task, {}).get("accuracy"),
                                       evaluations[lab]["scores"].get(task, {}).get("stderr"))
                            if lab in evaluations else "—" for lab in labels}})
        if best is not None:
            report.bold.add((core_row, best))
        versions |= {e.get("lm_eval_version") for e in evaluations.values()}
        missing = [lab for lab in labels if lab not in evaluations]
        if missing:
            report.notes.append(f"{name}: {', '.join(missing)} not evaluated on this setting (tasks, shots, limit); "
                                "left out of its verdict")
    if len(versions) > 1:
        report.notes.append(f"downstream scores come from different lm_eval versions ({', '.join(sorted(map(str, versions)))})")
    report.table = pd.concat([report.table, pd.DataFrame(rows, columns=report.table.columns)], ignore_index=True)
