"""The exported folder's README.md: where the weights come from (experiment, run, step, held-out loss,
micro-arch version), the run's metrics table, and its loss curve (loss.png) when metrics.csv is there."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import micro_arch


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def plot_loss(metrics_csv: Path, out: Path) -> bool:
    if not metrics_csv.is_file():
        return False
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    train = [(float(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    val = [(float(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for points, label, style in ((train, "training", "-"), (val, "held-out", "o-")):
        if points:
            ax.plot(*zip(*points), style, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def provenance(run_dir: Path, cfg, payload: dict, checkpoint: Path) -> dict:
    summary = _read_json(run_dir / "summary.json")
    best = payload.get("best_val_loss")
    return {"experiment": cfg.name, "run_id": run_dir.name, "run_dir": str(run_dir.resolve()),
            "checkpoint": checkpoint.name, "step": payload.get("step"), "tokens_seen": payload.get("tokens"),
            "held_out_loss": summary.get("final_val_loss"),
            "best_held_out_loss": None if best in (None, float("inf")) else best,
            "micro_arch_version": micro_arch.__version__, "parent": _read_json(run_dir / "parent.json") or None}


def write_card(folder: Path, run_dir: Path, info: dict, layout, check: dict) -> None:
    has_plot = plot_loss(run_dir / "metrics.csv", folder / "loss.png")
    summary = _read_json(run_dir / "summary.json")
    held_out = _read_json(run_dir / "eval.json")
    lines = ["---", "library_name: transformers", "tags: [micro-arch]", "---", "",
             f"# {info['experiment']} ({info['run_id']})", "",
             f"A `{layout.hf_class}` exported by micro-arch {info['micro_arch_version']} from the run "
             f"`{info['run_dir']}`, checkpoint `{info['checkpoint']}`.", "",
             "| provenance | |", "|---|---|"]
    for key in ("experiment", "run_id", "checkpoint", "step", "tokens_seen", "held_out_loss", "best_held_out_loss",
                "micro_arch_version"):
        lines.append(f"| {key} | {info.get(key)} |")
    parent = info.get("parent") or {}
    if parent:  # a run (at a step) or a Hugging Face folder (of a class)
        at = f"step {parent['step']}" if parent.get("step") is not None else parent.get("hf_class", parent.get("type"))
        lines.append(f"| started from | {parent.get('path')} ({at}) |")
    metrics = {k: v for k, v in {**summary, **held_out}.items() if isinstance(v, (int, float))
               and not isinstance(v, bool) and k not in ("format_version", "world_size", "pid")}
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", f"Checked after writing: transformers' logits on a fixed batch of {check['tokens']} tokens differ "
              f"from micro-arch's by at most {check['max_abs_diff']:.2e} ({check['dtype']} weights).", ""]
    if has_plot:
        lines += ["![loss curve](loss.png)", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(FOLDER)", "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
              "```", ""]
    (folder / "README.md").write_text("\n".join(lines))
