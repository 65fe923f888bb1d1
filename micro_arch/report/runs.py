"""Reading run directories for a report: checks, summary, curves, held-out metrics and samples.

Held-out metrics come from evaluate_run over the whole held-out split and are kept in the run's eval.json,
stamped with the checkpoint and settings they were computed from, so that a second compare reuses them.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from micro_arch.checkpoint import has_checkpoints, latest_checkpoint
from micro_arch.errors import MicroArchError
from micro_arch.rundir import SUMMARY_FORMAT_VERSION, process_alive, read_run_config


@dataclass
class Run:
    path: Path
    summary: dict
    held_out: dict  # eval.json
    reused_eval: bool
    curves: object  # metrics.csv as a DataFrame, None when absent
    samples: list[dict]  # [{"prompt": ..., "text": ...}]
    corpus_key: str | None  # the held-out text's identity, independent of the tokenizer
    settings: dict  # the resolved config.yaml, flattened to dotted keys
    notes: list[str] = field(default_factory=list)
    label: str = ""


def read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MicroArchError(f"{path}: not valid JSON ({err}); the file is damaged, "
                             "rerun what wrote it") from None


def check_run_dir(path: Path) -> dict:
    """The run's summary.json, once the directory is a completed run of the current format."""
    if not path.exists():
        raise MicroArchError(f"{path}: no such run directory; pass folders such as "
                             "runs/<experiment>/<run-id>")
    if not path.is_dir():
        raise MicroArchError(f"{path}: not a directory; pass run folders such as runs/<experiment>/<run-id>")
    if not (path / "summary.json").is_file():
        raise MicroArchError(f"{path}: incomplete run: no summary.json (a run writes it when training "
                             "starts); pass a run directory that `micro-arch run` has trained, or leave "
                             "this one out")
    summary = read_json(path / "summary.json")
    version = summary.get("format_version")
    if version != SUMMARY_FORMAT_VERSION:
        age = ("an older" if isinstance(version, int) and version < SUMMARY_FORMAT_VERSION else
               "a newer" if isinstance(version, int) else "an unknown")
        raise MicroArchError(f"{path}: run from {age} format (summary.json format_version {version}, this "
                             f"micro-arch reads {SUMMARY_FORMAT_VERSION}); train it again with this version "
                             "to compare it")
    if summary.get("status") != "completed":
        raise MicroArchError(f"{path}: {run_state(path, summary)}; or leave it out of the comparison")
    if not latest_checkpoint(path).is_file():
        raise MicroArchError(f"{path}: incomplete run: no checkpoint ({latest_checkpoint(path)} is missing), "
                             "which the report needs to evaluate it; restore it or leave the run out")
    return summary


def _alive(pid) -> bool | None:
    """Whether process `pid` of this host still exists (None: cannot tell)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    return process_alive(pid)


def run_state(path: Path, summary: dict) -> str:
    """What an unfinished run is, in words, with what to do about it.

    summary.json's status says 'completed', 'interrupted' (stopped by a signal, checkpoint saved), 'stopped'
    (an error), 'diverged' (a non-finite loss: not ranked, and not worth resuming) or 'running'. A run without
    a checkpoint cannot be resumed: then the advice is a new run. A run killed without warning (kill -9, a
    crash, a power cut) still says 'running', so 'running' is checked against the pid and host the trainer records: on this host, a pid that is gone
    means crashed or killed; on another host (or without a pid) it cannot be told apart, and the time
    of the last summary update (refreshed at least every few log steps while training) is shown.
    """
    status, step, total = summary.get("status"), summary.get("steps"), summary.get("total_steps")
    at = f"step {step} of {total}" if total else f"step {step}"
    # the trainer's own command keeps the run's --set overrides; without them a resume could change the run
    command = summary.get("resume_command") or f"micro-arch run experiments/{summary.get('experiment')} --resume {path}"
    resume = f"`{command}`"
    if status == "diverged":
        kept = summary.get("last_finite_checkpoint")
        return (f"diverged at step {summary.get('diverged_at_step', step)} (a non-finite loss; "
                + (f"its last finite checkpoint is {kept}" if kept else "no checkpoint was written")
                + "), so it is not ranked; its summary.json names the likely causes: fix the setting in its "
                  f"command (`{_new_run_command(command)}`) and train it again")
    updated = summary.get("updated_at")
    alive = _alive(summary.get("pid")) if summary.get("host") == socket.gethostname() else None
    if not has_checkpoints(path) and not (status == "running" and alive is not False):
        # nothing to resume from, so resuming would only fail: the advice is a new run
        why = {"interrupted": "interrupted", "stopped": f"stopped by an error ({summary.get('error') or 'not recorded'})",
               "running": f"crashed or killed (its process {summary.get('pid')} is gone)"}
        return (f"{why.get(status, f'left with status {status!r}')} at {at}, before its first checkpoint, so it cannot "
                f"be resumed; start it again with `{_new_run_command(command)}` and delete this folder")
    if status == "interrupted":
        return f"interrupted at {at} (checkpoint saved); resume it with {resume}"
    if status == "stopped":  # the trainer stopped on an error, which it names
        return f"stopped by an error at {at} ({summary.get('error') or 'not recorded'}); fix it and resume with {resume}"
    if status != "running":
        return f"incomplete run (status {status!r} at {at}); finish it with {resume}"
    if alive:
        return f"still running ({at}, pid {summary['pid']}); its results are final when it has finished"
    if alive is False:
        return (f"crashed or killed at {at} (summary.json says status 'running', but its process "
                f"{summary['pid']} is gone; last update {updated or 'unknown'}); resume it with {resume}")
    where = f" on {summary['host']}" if summary.get("host") else ""
    return (f"running or crashed ({at}; summary.json last updated {updated or 'at an unknown time'}{where}, "
            f"which this machine cannot check); wait for it to finish, or if it died, resume it with {resume}")


def _new_run_command(resume_command: str) -> str:
    """The command that trains the run afresh: its resume command without --resume RUN_DIR."""
    import shlex

    words = shlex.split(resume_command)
    if "--resume" in words:
        at = words.index("--resume")
        del words[at:at + 2]
    return shlex.join(words)


def unfinished_state(path: Path) -> str | None:
    """run_state's words for a run whose summary.json says it is not completed; None otherwise."""
    try:
        summary = json.loads((Path(path) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or summary.get("status") in (None, "completed"):
        return None
    return f"{path}: {run_state(Path(path), summary)}"


def read_curves(path: Path):
    """metrics.csv as a DataFrame, or None when the run has none."""
    import pandas as pd

    csv = path / "metrics.csv"
    if not csv.is_file() or csv.stat().st_size == 0:
        return None
    return pd.read_csv(csv)


def held_out_metrics(path: Path, batch_size: int, max_batches: int | None, device: str) -> tuple[dict, bool]:
    """(eval.json's metrics, whether they were reused) for the run's latest checkpoint."""
    from micro_arch.eval.evaluate import evaluate_run, evaluation_stamp

    cached = path / "eval.json"
    if cached.is_file():
        try:
            found = read_json(cached)
        except MicroArchError:
            found = {}
        if isinstance(found, dict) and found.get("evaluated") == evaluation_stamp(path, None, batch_size, max_batches):
            return found, True
    return evaluate_run(path, batch_size=batch_size, max_batches=max_batches, device=device), False


def held_out_text_key(path: Path) -> str | None:
    """The held-out text's identity without the tokenizer (data_fingerprint includes the tokenizer)."""
    from micro_arch.data.prepare import Corpus
    from micro_arch.data.shards import cache_root

    try:
        data = read_run_config(path, anchor=True).data
        return Corpus(data, cache_root(data.cache_dir)).key
    except MicroArchError:
        return None  # e.g. the source files are gone: only data_fingerprint can tell then


def flat_settings(path: Path) -> dict:
    """config.yaml as {"model.defaults.Norm": "rmsnorm", ...}; lists stay whole values."""
    import yaml

    from micro_arch.config import dotted

    config = path / "config.yaml"
    return dotted(yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}


def lineage(path: Path, max_depth: int = 8) -> str:
    """Where a run started from, followed back through each parent's parent.json: "scratch" for a run
    trained from random weights, else e.g. "shakespeare-sft/<id> step 300 <- shakespeare-char/<id> step 2000"."""
    links, seen = [], set()
    while len(links) < max_depth:
        parent_file = path / "parent.json"
        if not parent_file.is_file():
            break
        parent = read_json(parent_file)
        if parent.get("type") != "micro-arch run":
            links.append(f"{parent.get('type', 'folder')} {parent.get('path')}")
            break
        path = Path(parent["path"])
        step = f" step {parent['step']}" if parent.get("step") is not None else ""
        links.append(f"{parent.get('experiment')}/{parent.get('run_id')}{step}")
        if path in seen or not path.is_dir():
            break  # moved or deleted: the chain is known only this far
        seen.add(path)
    return " <- ".join(links) if links else "scratch"


def collect_run(path: Path, batch_size: int = 32, max_batches: int | None = None, device: str = "auto",
                prompts: list[str] | None = None, status=lambda text: None) -> Run:
    """Everything a report needs from one run directory; MicroArchError when it cannot be compared."""
    summary = check_run_dir(path)
    status(f"evaluating {path}")
    held_out, reused = held_out_metrics(path, batch_size, max_batches, device)
    notes = []
    if summary.get("data_fingerprint") != held_out.get("data_fingerprint"):
        notes.append(f"{path}: the held-out data changed since training (data_fingerprint "
                     f"{summary.get('data_fingerprint')} then, {held_out.get('data_fingerprint')} now); its "
                     "full-split numbers are on the new data, its curves on the old")
    if prompts:
        from micro_arch.eval.generate import sample_from_run

        status(f"sampling from {path}")
        texts = sample_from_run(path, prompts, seed=0, device=device)
        samples = [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]
    else:
        samples = read_json(path / "samples.json") if (path / "samples.json").is_file() else []
    curves = read_curves(path)
    if curves is None:
        notes.append(f"{path}: no metrics.csv, so no loss curves for this run")
    return Run(path, summary, held_out, reused, curves, samples, held_out_text_key(path), flat_settings(path),
               notes)
