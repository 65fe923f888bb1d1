"""Downstream task scores of a run through lm-evaluation-harness, kept in the run's downstream.json.

    evaluate_tasks(run_dir, ["shakespeare_mc"], include_path="tasks")   # -> the evaluation written

The run is served by the `micro-arch` lm-eval model (micro_arch.eval.harness). Before any model is loaded:
lm_eval must be installed, the run must have a checkpoint, the task names must be known (the built-in tasks
and the YAMLs under include_path), and each task's data must load: a hub task with no connection to the hub
is one line, and a local task (`dataset_path: json` with local `data_files`) needs no network at all.

downstream.json holds a list of evaluations, one per setting (tasks, shots, limit, chat template): a new
evaluation of the same setting replaces the old one. Each has per-task accuracy, lm-eval's standard error, the
chance level, the centered accuracy, and the CORE-style mean (micro_arch.eval.core), with the lm_eval version
and the checkpoint it scored. Runs are compared on downstream scores only within one setting.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from pathlib import Path

from micro_arch.errors import MicroArchError

FILE = "downstream.json"
FORMAT_VERSION = 1
INSTALL = "pip install -e '.[eval]' (or pip install 'lm_eval>=0.4,<0.5')"


def require_lm_eval() -> str:
    """lm_eval's version; one line on how to install it when it is missing."""
    try:
        import lm_eval
    except ImportError:
        raise MicroArchError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval.__version__


def setting_of(tasks: list[str], num_fewshot: int | None, limit: int | None, chat_template: bool) -> dict:
    """What makes two evaluations comparable."""
    return {"tasks": sorted(tasks), "num_fewshot": num_fewshot, "limit": limit, "chat_template": bool(chat_template)}


def setting_text(setting: dict) -> str:
    shots = "default shots" if setting["num_fewshot"] is None else f"{setting['num_fewshot']}-shot"
    limit = "all documents" if setting["limit"] is None else f"first {setting['limit']} documents"
    chat = ", chat template" if setting.get("chat_template") else ""
    return f"{', '.join(setting['tasks'])}; {shots}; {limit}{chat}"


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager for these tasks, names checked. Indexing lm-eval's own tasks takes seconds, so
    when every task is under include_path, only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise MicroArchError(f"--include-path {include_path}: no such folder; pass a folder of task YAMLs such as "
                             "tasks/shakespeare-mc")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    check_task_names(manager, tasks, include_path)
    return manager


def check_task_names(manager, tasks: list[str], include_path: str | None) -> None:
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean: {', '.join(close)}?" if close else "see `lm-eval ls tasks` for the built-in ones"
            where = (f" or under --include-path {include_path}" if include_path else
                     "; local tasks come with --include-path DIR")
            raise MicroArchError(f"--tasks {name}: no such lm-eval task among the built-in ones{where} ({hint})")


def load_tasks(manager, tasks: list[str], reason: str | None = None) -> None:
    """Every task's data, read now: a hub task offline or a missing local data file is one line. reason: why
    the hub cannot be reached (micro_arch.data.sources.hub_offline_reason), None when it can."""
    from micro_arch.data.sources import offline_mode

    for name in tasks:
        try:
            with offline_mode(reason is not None):
                manager.load([name])
        except (ConnectionError, OSError) as err:
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            if reason is not None and ("hub" in text.lower() or "offline" in text.lower() or "reach" in text.lower()):
                raise MicroArchError(f"--tasks {name}: its data is on the Hugging Face hub and not in the local cache, "
                                     f"and the hub cannot be reached ({reason}); run once with a connection, or use "
                                     "a local task (a YAML with dataset_path: json and local data_files, passed "
                                     "with --include-path)") from None
            raise MicroArchError(f"--tasks {name}: its data could not be read ({text}); a local task's data_files "
                                 "are read relative to the folder you run in") from None


def check_request(run_dir, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
                  checkpoint=None) -> Path:
    """The checkpoint to score, once the request makes sense (before lm-eval or any task is loaded)."""
    from micro_arch.checkpoint import latest_checkpoint, resolve_checkpoint
    from micro_arch.rundir import read_run_config

    run_dir = Path(run_dir)
    if not [t for t in tasks if t.strip()]:
        raise MicroArchError("--tasks: name at least one task, e.g. --tasks hellaswag,arc_easy")
    if limit is not None and limit < 1:
        raise MicroArchError(f"--limit {limit}: must be at least 1 (documents per task), or left out for all")
    if num_fewshot is not None and num_fewshot < 0:
        raise MicroArchError(f"--num-fewshot {num_fewshot}: must be at least 0")
    read_run_config(run_dir)
    ckpt = resolve_checkpoint(run_dir, checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if not ckpt.is_file():
        raise MicroArchError(f"{run_dir}: no checkpoint to evaluate ({ckpt} is missing); train the run first, or "
                             "pass --checkpoint with one of its checkpoints/step_*.pt")
    return ckpt


def evaluate_tasks(run_dir, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
                   batch_size: int = 16, include_path: str | None = None, checkpoint=None, device: str = "auto",
                   apply_chat_template: bool = False, quiet_lm_eval: bool = True, manager=None) -> dict:
    """Score the run on the tasks, write the evaluation into its downstream.json, and return it. `manager`: a
    TaskManager from task_manager() to reuse across runs."""

    run_dir = Path(run_dir)
    tasks = [t.strip() for t in tasks if t.strip()]
    ckpt = check_request(run_dir, tasks, num_fewshot, limit, checkpoint)
    version = require_lm_eval()
    import lm_eval

    import micro_arch.eval.harness  # noqa: F401  (registers the micro-arch model)

    levels = _quiet(quiet_lm_eval)
    try:
        from micro_arch.data.sources import hub_offline_reason, offline_mode

        manager = manager or task_manager(tasks, include_path)
        reason = hub_offline_reason()  # checked once (at most 3 s): offline, lm-eval reads the local cache only
        load_tasks(manager, tasks, reason)
        model_args = {"run": str(run_dir), "checkpoint": checkpoint, "device": device}
        with offline_mode(reason is not None):
            out = lm_eval.simple_evaluate(model="micro-arch", model_args=model_args, tasks=tasks,
                                          num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                          task_manager=manager, log_samples=True,
                                          apply_chat_template=apply_chat_template)
    finally:
        _restore(levels)
    evaluation = {**setting_of(tasks, num_fewshot, limit, apply_chat_template), "lm_eval_version": version,
                  "checkpoint": str(ckpt.relative_to(run_dir)) if ckpt.is_relative_to(run_dir) else str(ckpt),
                  "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **scores_of(out)}
    save_evaluation(run_dir, evaluation)
    return evaluation


def scores_of(out: dict) -> dict:
    """Per-task scores and the CORE-style aggregate from simple_evaluate's result (with its samples)."""
    from micro_arch.eval.core import aggregate, centered, chance_of

    scores = {}
    for task, config in out["configs"].items():
        result = out["results"].get(task, {})
        output_type = config.get("output_type")
        metric = ("acc" if "acc,none" in result else
                  next((k.split(",")[0] for k in result if k.startswith("exact_match,")), None))
        entry = {"output_type": output_type, "metric": metric, "shots": out.get("n-shot", {}).get(task),
                 "n": (out.get("n-samples", {}).get(task) or {}).get("effective")}
        if metric is None:  # e.g. perplexity tasks: their own metrics, no accuracy to center
            entry["metrics"] = {k.split(",")[0]: v for k, v in result.items() if "," in k and "stderr" not in k
                                and isinstance(v, (int, float))}
            scores[task] = {**entry, "accuracy": None, "stderr": None, "chance": None, "centered": None,
                            "centered_stderr": None}
            continue
        key = next(k for k in result if k.startswith(f"{metric},"))
        accuracy = float(result[key])
        se = result.get(key.replace(f"{metric},", f"{metric}_stderr,"))
        se = float(se) if isinstance(se, (int, float)) else None
        counts = [len(s["arguments"]) for s in out.get("samples", {}).get(task, [])]
        chance = chance_of(counts) if output_type == "multiple_choice" else 0.0
        scores[task] = {**entry, "accuracy": accuracy, "stderr": se, "chance": chance,
                        "centered": centered(accuracy, chance),
                        "centered_stderr": None if se is None else se / (1 - chance)}
        if "acc_norm,none" in result:
            scores[task]["acc_norm"] = float(result["acc_norm,none"])
    return {"scores": scores, "core": aggregate(scores)}


def read_evaluations(run_dir) -> list[dict]:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MicroArchError(f"{path}: not valid JSON ({err}); delete it and evaluate again") from None
    return list(data.get("evaluations", []))


def save_evaluation(run_dir, evaluation: dict) -> None:
    from micro_arch.rundir import write_json

    key = setting_of(evaluation["tasks"], evaluation["num_fewshot"], evaluation["limit"],
                     evaluation.get("chat_template", False))
    kept = [e for e in read_evaluations(run_dir)
            if setting_of(e["tasks"], e["num_fewshot"], e["limit"], e.get("chat_template", False)) != key]
    write_json(Path(run_dir) / FILE, {"format_version": FORMAT_VERSION, "evaluations": kept + [evaluation]})


def _quiet(on: bool) -> dict:
    """lm-eval's INFO/WARNING chatter (one line per truncated request, per metric default) off while it runs."""
    if not on:
        return {}
    names = ["lm_eval", "lm-eval", "datasets", "transformers"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    return levels


def _restore(levels: dict) -> None:
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
