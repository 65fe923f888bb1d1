"""`micro-arch run EXP --seeds N`: one configuration trained under N seeds, a seed group.

    runs/<experiment>/<time>-<id>/         the group folder
        group.json                         the experiment, its --set overrides and the seeds
        seed-1337/  seed-1338/  ...        one ordinary run folder per seed (summary.json: group, seed)

`--resume` given the group folder or any member trains what is unfinished: a completed member is left
alone, an interrupted one resumes from its checkpoint, one that never reached a checkpoint starts again.
On a CPU (or one GPU) the members train one after another in this process; where several GPUs are
visible, side by side, one per GPU, each in its own process (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from micro_arch.errors import MicroArchError
from micro_arch.rundir import GROUP_FILE, member_dir, new_run_dir, write_json
from micro_arch.train.distributed import Process, run_in_slots

console = Console()


def seed_list(spec: str | list[int] | int, base: int) -> list[int]:
    """'3' (or 3): three seeds from the experiment's train.seed on; '1,5,9' (or a list): those seeds."""
    if isinstance(spec, list):
        seeds = spec
    elif isinstance(spec, int) or "," not in str(spec).strip(","):
        text = str(spec).strip(",")
        if not text.isdigit() or int(text) < 1:
            raise MicroArchError(f"--seeds {spec}: give a number of seeds (at least 1, e.g. --seeds 3) or a "
                                 "comma-separated list of seeds (e.g. --seeds 1,5,9)")
        if "," in str(spec):  # '7,' : the one seed 7
            return [int(text)]
        return [base + i for i in range(int(text))]
    else:
        try:
            seeds = [int(part) for part in str(spec).split(",") if part.strip()]
        except ValueError:
            raise MicroArchError(f"--seeds {spec}: a list of seeds is whole numbers joined by commas, "
                                 "e.g. --seeds 1,5,9") from None
    if len(set(seeds)) != len(seeds):
        raise MicroArchError(f"--seeds {spec}: a seed appears twice; each member needs its own seed")
    return list(seeds)


def group_folder(path) -> Path | None:
    """The group folder of `path` (itself or a member's parent), or None when it is not part of a group."""
    if path is None:
        return None
    path = Path(path)
    for folder in (path, path.parent):
        if (folder / GROUP_FILE).is_file():
            return folder
    return None


def member_state(folder: Path) -> str:
    """'completed', 'resumable' (it has a checkpoint) or 'fresh' (nothing to continue from)."""
    from micro_arch.checkpoint import has_checkpoints

    try:
        status = json.loads((folder / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None
    if status == "completed":
        return "completed"
    return "resumable" if folder.is_dir() and has_checkpoints(folder) else "fresh"


def run_group(target, seeds=None, overrides=None, resume=None, runs_root="runs", nproc=1, checkpoint=None) -> Path:
    """Train the seed group of `target` (new, or the one `resume` belongs to); returns the group folder."""
    from micro_arch.experiment import load_experiment

    overrides = list(overrides or [])
    if checkpoint:
        raise MicroArchError("--checkpoint picks one run's checkpoint; a seed group resumes each member from "
                             "its latest intact checkpoint: leave --checkpoint out")
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides):
        raise MicroArchError("--set train.seed=... with --seeds: the seeds come from --seeds; drop the override")
    cfg = load_experiment(target, overrides)
    group = group_folder(resume)
    if resume is not None and group is None:
        raise MicroArchError(f"--resume {resume}: not a seed group (no {GROUP_FILE} in it or in its parent); "
                             "resume a single run without --seeds")
    changed = False  # the group's overrides changed (a longer budget, other cadences): completed members too
    if group is None:
        chosen = seed_list(seeds if seeds is not None else 1, cfg.train.seed)
        group = new_run_dir(runs_root, cfg.name)
    else:
        recorded = json.loads((group / GROUP_FILE).read_text())
        chosen = recorded["seeds"] if seeds is None else seed_list(seeds, cfg.train.seed)
        chosen = recorded["seeds"] + [s for s in chosen if s not in recorded["seeds"]]  # --seeds adds members
        changed = recorded.get("overrides", []) != overrides
        _check_members_agree(group, chosen, target, overrides)
    write_json(group / GROUP_FILE, {"experiment": cfg.name, "target": str(target), "overrides": overrides,
                                    "seeds": chosen, "started_in": os.getcwd()})
    command = shlex.join(["micro-arch", "run", str(target), "--resume", str(group)]
                         + (["--set", *overrides] if overrides else []))
    plan = [(seed, member_dir(group, seed), member_state(member_dir(group, seed))) for seed in chosen]
    if changed:  # run_experiment extends a completed member to a new budget, or says there is nothing to do
        plan = [(seed, folder, "resumable" if state == "completed" else state) for seed, folder, state in plan]
    todo = [(seed, folder, state) for seed, folder, state in plan if state != "completed"]
    done = len(plan) - len(todo)
    console.print(f"[bold]seed group[/] {group}: seeds {', '.join(map(str, chosen))}"
                  + (f" ({done} completed, {len(todo)} to train)" if done else ""), highlight=False)
    gpus = gpus_for(cfg.train.device) if nproc == 1 else []
    try:
        if len(gpus) > 1 and len(todo) > 1:
            side_by_side([Job(f"seed {seed}", str(target), [*overrides, f"train.seed={seed}"], folder, state)
                          for seed, folder, state in todo], runs_root, gpus)
        else:
            from micro_arch.commands.run import run_experiment

            for i, (seed, folder, state) in enumerate(todo):
                console.rule(f"seed {seed} ({done + i + 1} of {len(plan)})")
                if state == "fresh" and folder.exists():
                    shutil.rmtree(folder)  # a start that never reached a checkpoint: nothing to keep
                run_experiment(target, overrides=[*overrides, f"train.seed={seed}"], runs_root=runs_root,
                               nproc=nproc, resume=folder if state == "resumable" else None,
                               into=folder if state == "fresh" else None)
    except KeyboardInterrupt:
        console.print(f"the seed group stopped; resume every unfinished member with:\n  {command}",
                      soft_wrap=True, highlight=False)
        raise
    console.print(f"seed group complete: {group} ({len(plan)} seeds); compare groups with "
                  f"`micro-arch compare {group} OTHER_GROUP`", soft_wrap=True, highlight=False)
    return group


def _check_members_agree(group: Path, seeds: list[int], target, overrides: list[str]) -> None:
    """Every trained member could be resumed with these settings (run.check_resumable: the same model and data,
    a budget or cadence may change), so members trained now join a group of one configuration."""
    from micro_arch.commands.run import check_resumable
    from micro_arch.experiment import load_experiment
    from micro_arch.rundir import read_run_config

    for seed in seeds:
        folder = member_dir(group, seed)
        if (folder / "config.yaml").is_file():
            cfg = load_experiment(target, [*overrides, f"train.seed={seed}"])
            if cfg.model.vocab_size is None:  # the tokenizer's, filled in when the member started
                cfg.model.vocab_size = read_run_config(folder).model.vocab_size
            check_resumable(folder, cfg)


def gpus_for(device: str) -> list[str]:
    """The GPUs to train runs side by side on: none for a named device (cpu, cuda:1), where the user chose."""
    from micro_arch.train.distributed import visible_gpus

    return visible_gpus() if device in ("auto", "cuda") else []


@dataclass
class Job:
    """One run to train in a process of its own: a seed group's member or a ladder's point."""
    name: str
    target: str
    overrides: list[str]
    folder: Path
    state: str  # member_state: 'fresh' or 'resumable'


def side_by_side(jobs: list[Job], runs_root, gpus: list[str]) -> None:
    """One job per GPU at a time, each a `micro-arch run` process that sees only its GPU (CUDA_VISIBLE_DEVICES),
    its output in <folder>.log. Untested on a machine with several GPUs (written for it; the test machines have
    at most one, where jobs train one after another in this process instead)."""
    processes = []
    for job in jobs:
        if job.state == "fresh" and job.folder.exists():
            shutil.rmtree(job.folder)
        args = ["run", job.target, "--runs-dir", str(runs_root), "--set", *job.overrides,
                *(["--resume", str(job.folder)] if job.state == "resumable" else ["--into", str(job.folder)])]
        processes.append(Process(job.name, args, job.folder.with_name(job.folder.name + ".log")))
    failed = run_in_slots(processes, [{"CUDA_VISIBLE_DEVICES": g} for g in gpus], console)
    if failed:
        raise MicroArchError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; fix the cause and start the same "
                             "command again (completed runs are kept)")


