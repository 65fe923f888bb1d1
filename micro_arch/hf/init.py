"""`model.init_from`: start a model from a micro-arch run's weights or from a local Hugging Face folder.

    from micro_arch.hf.init import load_initial_weights
    parent = load_initial_weights(model, cfg.model, run_dir)   # None when cfg.model.init_from is unset

PATH may be a run directory (its checkpoints/latest.pt), one of its checkpoint files
(RUN_DIR/checkpoints/step_N.pt), or a local Hugging Face folder of a supported layout (micro_arch.hf.layouts).
The experiment's model must match the source (micro_arch.hf.match), except for what a later stage may change:
- max_seq_len: RoPE needs nothing; a learned position table keeps its rows, and new positions copy the
  table over again (row p takes row p mod old length, as Longformer extended RoBERTa); a shorter one is cut;
- vocab_size may grow (new special tokens): new embedding and head rows start at the mean of the old rows;
- rope_scaling (position interpolation for a longer context), dropout, init_std and training-only block
  arguments.
The returned provenance dict is also written to RUN_DIR/parent.json when run_dir is given.
"""

from __future__ import annotations

from pathlib import Path

import torch

from micro_arch.config import ModelConfig
from micro_arch.errors import MicroArchError
from micro_arch.rundir import write_json

PARENT_FILE = "parent.json"


def resolve_source(path_text: str) -> tuple[str, Path]:
    """('run', run_dir) / ('checkpoint', file) / ('huggingface', folder), or a clear error (no network)."""
    path = Path(path_text).expanduser()
    if path.is_file() and path.suffix == ".pt" and path.parent.name == "checkpoints":
        return "checkpoint", path
    if path.is_dir() and (path / "config.yaml").is_file():
        return "run", path
    if path.is_dir() and (path / "config.json").is_file():
        return "huggingface", path
    if path.exists():
        raise MicroArchError(f"model.init_from {path_text!r}: neither a micro-arch run directory (config.yaml and "
                             "checkpoints/) nor a Hugging Face model folder (config.json)")
    hint = ""
    if "/" in path_text and not path_text.startswith((".", "/", "~")) and path_text.count("/") == 1:
        hint = (f"; it looks like a Hugging Face hub name, and micro-arch never downloads: fetch it first "
                f"(`hf download {path_text} --local-dir DIR`) and pass the folder")
    raise MicroArchError(f"model.init_from {path_text!r}: no such file or folder{hint}")


def run_dir_of(kind: str, path: Path) -> Path:
    """The run directory of a resolved 'run' or 'checkpoint' source (a checkpoint lies in RUN/checkpoints/)."""
    return path.parent.parent if kind == "checkpoint" else path


def read_source(path_text: str) -> tuple[ModelConfig, dict, dict]:
    """(the source's model config, its state dict in micro-arch names, provenance) for an init_from PATH."""
    kind, path = resolve_source(path_text)
    if kind == "huggingface":
        from micro_arch.hf.load import read_hf_folder

        return read_hf_folder(path)
    from micro_arch.checkpoint import latest_checkpoint, load_checkpoint
    from micro_arch.model.registry import load_experiment_blocks
    from micro_arch.rundir import read_run_config

    run_dir = run_dir_of(kind, path)
    file = path if kind == "checkpoint" else latest_checkpoint(run_dir)
    cfg = read_run_config(run_dir)
    load_experiment_blocks(run_dir)  # the run's copies of its experiment's blocks, if it has any
    try:
        payload = load_checkpoint(file, "cpu")
    except MicroArchError as err:
        raise MicroArchError(f"model.init_from {path_text}: {str(err).split(';')[0]}; "
                             f"{_intact_instead(run_dir, file)}") from None
    best = payload.get("best_val_loss")
    provenance = {"type": "micro-arch run", "path": str(run_dir.resolve()), "experiment": cfg.name,
                  "run_id": run_dir.name, "checkpoint": str(file.resolve()), "step": payload.get("step"),
                  "best_val_loss": None if best in (None, float("inf")) else best}
    return cfg.model, payload["model"], provenance


def _intact_instead(run_dir: Path, broken: Path) -> str:
    """Advice that works when init_from's checkpoint cannot be read: another of the run's checkpoints, by path."""
    from micro_arch.checkpoint import load_checkpoint, step_checkpoints

    for other in step_checkpoints(run_dir):
        if other.resolve() == broken.resolve():
            continue
        try:
            load_checkpoint(other, "cpu")
        except MicroArchError:
            continue
        return f"start from its newest intact checkpoint instead: --set model.init_from={other}"
    return f"{run_dir} has no intact checkpoint to start from"


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = weight.mean(0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra.to(weight.dtype)])


def adapt_state_dict(state: dict, source: ModelConfig, target: ModelConfig) -> tuple[dict, dict]:
    """The source weights resized for the target's max_seq_len and vocab_size; and what changed."""
    state, changed = dict(state), {}
    if source.max_seq_len != target.max_seq_len:
        changed["max_seq_len"] = [source.max_seq_len, target.max_seq_len]
        table = state.get("pos_embed.weight")
        if table is not None:
            index = torch.arange(target.max_seq_len) % table.shape[0]
            state["pos_embed.weight"] = table[index].clone()
    if source.vocab_size != target.vocab_size:
        changed["vocab_size"] = [source.vocab_size, target.vocab_size]
        state["embed.weight"] = _grow_rows(state["embed.weight"], target.vocab_size)
        if target.tie_embeddings:
            state["head.weight"] = state["embed.weight"]
        else:
            state["head.weight"] = _grow_rows(state["head.weight"], target.vocab_size)
    for key in ("rope_scaling", "dropout"):
        if getattr(source, key) != getattr(target, key):
            changed[key] = [getattr(source, key), getattr(target, key)]
    return state, changed


def model_section(cfg: ModelConfig) -> str:
    """The settings of `cfg` that differ from the defaults, as one line of YAML to paste into a model section."""
    import yaml

    from micro_arch.config import to_dict

    default, mine = to_dict(ModelConfig()), to_dict(cfg)
    keep = {k: v for k, v in mine.items() if v != default[k] and k not in ("vocab_size", "init_from")}
    return yaml.safe_dump(keep, default_flow_style=True, sort_keys=False, width=1 << 20).strip()


def load_initial_weights(model, cfg: ModelConfig, run_dir: str | Path | None = None) -> dict | None:
    """Load cfg.init_from's weights into `model` (built from `cfg`) in place, after checking that the two
    models match; returns the provenance (also written to run_dir/parent.json), or None when init_from is
    unset. Raises MicroArchError naming the first difference when they do not match."""
    if not cfg.init_from:
        return None
    from micro_arch.hf.match import first_difference
    from micro_arch.model.model import Model

    source_cfg, state, provenance = read_source(cfg.init_from)
    with torch.device("meta"):  # structure and shapes only: a big source must not be built twice
        source_model = Model(source_cfg)
    difference = first_difference(source_cfg, source_model, cfg, model)
    if difference:
        shown = f"; the folder's model section: {model_section(source_cfg)}" \
            if provenance["type"] == "huggingface" else ""
        raise MicroArchError(f"model.init_from {cfg.init_from}: the experiment's model does not match the source: "
                             f"{difference}; make the model section match it (only max_seq_len, rope_scaling, a "
                             f"larger vocab_size and dropout may differ){shown}")
    state, changed = adapt_state_dict(state, source_cfg, cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise MicroArchError(f"model.init_from {cfg.init_from}: its weights do not fit the model "
                             f"({str(err).splitlines()[0]})") from None
    provenance = {**provenance, "changed": changed}
    if run_dir:  # falsy on the ranks that do not write
        write_json(Path(run_dir) / PARENT_FILE, provenance)
    return provenance


