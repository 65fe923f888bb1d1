"""Experiment configs: dataclasses with documented defaults, read from YAML, overridden from the command line.

config file -> raw dict (with `extends:` merged and `--set` overrides applied) -> validated dataclasses.
Every error names the file (or override) and the key, and suggests the nearest known key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from micro_arch.errors import MicroArchError, closest

ROLES = ("Norm", "Attn", "MLP", "MoE", "Mamba")


@dataclass
class LayerGroup:
    spec: str | list[str]  # a block string, or a list of them run as parallel branches
    repeat: int = 1

    def check(self, need) -> None:
        """The rules of these fields (need(ok, key or keys, message)); run by from_dict after reading."""
        need(self.repeat >= 1, "repeat", f"must be at least 1, got {self.repeat}")
        specs = self.spec if isinstance(self.spec, list) else [self.spec]
        need(len(specs) > 0, "spec", "an empty list of branches; write at least one block string")


@dataclass
class ModelConfig:
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (MHA); 1: MQA; between: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: each MLP picks its usual width (4*d for GELU, 8/3*d for SwiGLU)
    vocab_size: int | None = None  # None: taken from the tokenizer
    max_seq_len: int = 256
    positions: Literal["rope", "learned", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # RoPE position interpolation for context extension: positions divided by this
    defaults: dict[str, str] = field(
        default_factory=lambda: {
            "Norm": "rmsnorm", "Attn": "attention", "MLP": "swiglu", "MoE": "moe", "Mamba": "mamba",
        }
    )
    layers: list[LayerGroup] = field(
        default_factory=lambda: [LayerGroup("Norm->Attn->+->Norm->MLP->+", 4)]
    )
    final_norm: str | None = "Norm"  # a block string applied after the last layer; null for none
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    init_from: str | None = None  # a run directory or local Hugging Face folder to start from (micro_arch.hf)

    def check(self, need) -> None:
        """The rules of these fields (need(ok, key or keys, message)); run by from_dict after reading."""
        for key in ("d_model", "n_heads", "max_seq_len"):
            need(getattr(self, key) >= 1, key, f"must be positive, got {getattr(self, key)}")
        need(self.head_dim is not None or self.d_model % self.n_heads == 0, ("n_heads", "d_model", "head_dim"),
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim or change either")
        if self.n_kv_heads is not None:
            need(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, ("n_kv_heads", "n_heads"),
                 f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        need(len(self.layers) > 0, "layers", "no layers; write e.g. layers: [{spec: 'Norm->Attn->+', repeat: 2}]")
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        need(self.rope_scaling > 0, "rope_scaling", f"must be positive (1: none), got {self.rope_scaling}")
        for key in ("d_ff", "head_dim", "vocab_size"):
            value = getattr(self, key)
            need(value is None or value >= 1, key, f"must be at least 1 (or null for the default), got {value}")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        need(self.init_std >= 0, "init_std", f"must be >= 0, got {self.init_std}")


@dataclass
class SourceConfig:
    source: str  # 'shakespeare', a local file or glob (.txt/.jsonl/.parquet), or a hub dataset name
    weight: float = 1.0
    text_field: str = "text"


@dataclass
class DataConfig:
    source: str | list[SourceConfig] = "shakespeare"  # one source, or a weighted mixture
    text_field: str = "text"  # the column that holds text in .jsonl/.parquet/hub sources
    # 'char', 'bpe' (SentencePiece BPE with byte fallback), 'bytelevel' (Hugging Face tokenizers byte-level
    # BPE, as GPT-2 and Llama 3), a SentencePiece .model path, or a tokenizers .json path
    tokenizer: str = "char"
    vocab_size: int = 4096  # for 'bpe' and 'bytelevel'
    # 'bpe'/'bytelevel' train on at most this many bytes of training documents, spread over the whole corpus
    # (a small corpus: all of it). Training memory grows with it: SentencePiece adds roughly 11-14x its input.
    tokenizer_sample_bytes: int = 100_000_000
    val_fraction: float = 0.1  # held-out share, taken as whole documents from the end
    cache_dir: str | None = None  # None: $MICRO_ARCH_CACHE or ~/.cache/micro-arch
    val_source: str | None = None  # sft/dpo: held-out conversations or pairs (None: the last val_fraction)
    # at most this many training tokens (null: all). A hub source streams only about this much text.
    max_tokens: int | None = None
    # preparation (micro_arch/data/stream.py): documents are tokenized in worker processes (0: one per CPU)
    # and written to token shards of shard_tokens tokens; prepare_memory_mb bounds the memory of preparing
    # (this process, the workers, the text and tokens in flight) whatever the corpus size: fewer workers or
    # smaller pieces when it is small. Tokenizer training is apart: see tokenizer_sample_bytes
    workers: int = 0
    prepare_memory_mb: int = 1024
    shard_tokens: int = 100_000_000

    def check(self, need) -> None:
        """The rules of these fields (need(ok, key or keys, message)); run by from_dict after reading."""
        need(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        need(self.vocab_size >= 2, "vocab_size", "must be at least 2")
        need(self.val_source is None or bool(self.val_source), "val_source", "an empty string; leave it unset")
        need(self.tokenizer_sample_bytes >= 1, "tokenizer_sample_bytes", "must be at least 1")
        need(self.max_tokens is None or self.max_tokens >= 2, "max_tokens", "must be at least 2 (or null for all)")
        need(self.workers >= 0, "workers", "must be >= 0 (0: one per CPU)")
        need(self.prepare_memory_mb >= 256, "prepare_memory_mb", f"must be at least 256, got {self.prepare_memory_mb}")
        need(self.shard_tokens >= 1, "shard_tokens", "must be at least 1")


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None

    def check(self, need) -> None:
        """The rules of these fields (need(ok, key or keys, message)); run by from_dict after reading."""
        need(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0 (0: no samples), got {self.max_new_tokens}")
        need(self.temperature >= 0, "temperature", f"must be >= 0 (0: greedy), got {self.temperature}")
        need(self.top_k is None or self.top_k >= 1, "top_k", f"must be at least 1 (or null), got {self.top_k}")
        need(self.top_p is None or 0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (or null), got {self.top_p}")


@dataclass
class TrainConfig:
    batch_size: int = 12  # sequences per optimizer step per process, before accumulation
    seq_len: int = 64
    grad_accum: int = 1
    max_steps: int = 2000
    max_tokens: int | None = None  # if set, the step budget is derived from it
    # Equal compute: at most one of max_tokens, budget_tokens, budget_flops; it replaces max_steps, and the
    # steps are derived from it (budget_flops: flops_per_token x tokens_per_step per step), schedule included
    budget_tokens: float | None = None  # tokens (a float, so that 5e6 reads as a number)
    budget_flops: float | None = None  # training FLOPs (forward + backward), e.g. 1e13
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    # Muon (optimizer: muon) for hidden 2-D weights; embeddings, head, norms and n-D weights stay with AdamW.
    # Scale convention: AdamW-matching. The orthogonalised update is multiplied by 0.2*sqrt(max(rows, cols))
    # so its RMS is about an AdamW update's; muon_lr is therefore on AdamW's scale, follows the same
    # schedule (and min_lr/lr floor), and weight_decay shrinks weights by muon_lr*weight_decay per step.
    muon_lr: float = 0.005  # best 2-seed mean at 2000 steps of the default; docs/benchmarks.md
    muon_momentum: float = 0.95  # Nesterov momentum as in the reference Muon
    muon_nesterov: bool = True
    muon_ns_steps: int = 4  # Newton-Schulz steps (Polar Express coefficients; see micro_arch/muon.py)
    muon_ns_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs and CPUs with bf16 units, else fp32
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # share of the steps spent decaying in 'wsd'
    grad_clip: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPUs that support it
    compile: bool = False
    # torch.compile's mode: reduce-overhead adds CUDA graphs (static shapes: pretraining; GPU only), the
    # max-autotune modes search kernel configurations (a longer first step)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 1000
    seed: int = 1337  # initialisation and, unless data_seed is set, the order of the training data
    data_seed: int | None = None  # the order of the training data alone (paired designs: one data order, N inits)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    sample: SampleConfig = field(default_factory=SampleConfig)
    # pretrain: next tokens of text; sft: conversations (JSONL) with the loss on assistant tokens; dpo:
    # preference pairs against the frozen model.init_from (micro_arch/stages); sft and dpo need init_from
    stage: Literal["pretrain", "sft", "dpo"] = "pretrain"
    dpo_beta: float = 0.1  # DPO's KL strength: the implicit reward is beta * log(pi / pi_ref)
    dpo_precompute_reference: bool = False  # the reference's log-probs of every pair computed once at the start

    @property
    def data_order_seed(self) -> int:
        """The seed of the training data's order: data_seed when set, else seed."""
        return self.seed if self.data_seed is None else self.data_seed

    def check(self, need) -> None:
        """The rules of these fields (need(ok, key or keys, message)); run by from_dict after reading."""
        for key in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_every", "eval_batches",
                    "log_every", "checkpoint_every"):
            need(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}")
        need(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        need(self.dpo_beta > 0, "dpo_beta", f"must be positive, got {self.dpo_beta}")
        need(self.muon_lr > 0, "muon_lr", f"must be positive, got {self.muon_lr}")
        need(0 <= self.muon_momentum < 1, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        need(self.muon_ns_steps >= 1, "muon_ns_steps", f"must be at least 1, got {self.muon_ns_steps}")
        need(len(self.betas) == 2, "betas", f"needs two values, got {self.betas}")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(0.0 < self.decay_fraction <= 1.0, "decay_fraction", "must be in (0, 1]")
        need(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"must be at least 1 (or null to use max_steps), got {self.max_tokens}")
        budgets = [k for k in ("max_tokens", "budget_tokens", "budget_flops") if getattr(self, k) is not None]
        need(len(budgets) <= 1, budgets[-1] if budgets else "budget_flops",
             f"{' and '.join(budgets)} are set together; a run has one budget: keep one (the others null), "
             "or none to train max_steps steps")
        need(self.budget_tokens is None or self.budget_tokens >= 1, "budget_tokens",
             f"must be at least 1 (or null), got {self.budget_tokens}")
        need(self.budget_flops is None or self.budget_flops > 0, "budget_flops",
             f"must be positive (or null), got {self.budget_flops}")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip",
             f"must be positive (or null for no clipping), got {self.grad_clip}")
        need(self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")
        need(all(0 <= b < 1 for b in self.betas), "betas", f"each must be in [0, 1), got {self.betas}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.eps > 0, "eps", f"must be positive, got {self.eps}")


@dataclass
class ExperimentConfig:
    name: str = ""  # defaults to the experiment folder's name
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --- dict -> dataclass, with checks ------------------------------------------------------------


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp) -> str:
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        return "a list"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str):
    """Return `value` as type `tp`, or raise TypeError (the caller adds the location)."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except (TypeError, MicroArchError) as err:
                last = err
        if isinstance(last, MicroArchError):
            raise last
        raise TypeError(_describe(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError(_describe(tp))
    if dataclasses.is_dataclass(tp):
        if tp is LayerGroup and isinstance(value, (str, list)):
            value = {"spec": value}
        if tp is SourceConfig and isinstance(value, str):
            value = {"source": value}
        if not isinstance(value, dict):
            raise TypeError(_describe(tp))
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError("a list")
        (item,) = typing.get_args(tp)
        return [_checked(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError("a mapping")
        _, vt = typing.get_args(tp)
        return {str(k): _checked(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            raise TypeError("float") from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and type(value) is tp:
        return value
    if tp is Any:
        return value
    raise TypeError(_describe(tp))


_EMPTY = {  # what an empty value means, for keys where "None should be str" would say too little
    "spec": "is empty; a spec is a block string such as 'Norm->Attn->+->Norm->MLP->+', or a list of them "
            "run as parallel branches",
}


def _checked(value, tp, where):
    try:
        return _convert(value, tp, where)
    except TypeError as err:
        if value is None or value == "":
            empty = _EMPTY.get(where.rsplit(".", 1)[-1], f"is empty; it should be {err}")
            raise MicroArchError(f"{where}: {empty}", where=where) from None
        raise MicroArchError(f"{where}: {value!r} should be {err}", where=where) from None


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from a plain dict: unknown keys and wrong types are errors that say where."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise MicroArchError(f"{where}: unknown key {key!r}{closest(str(key), known)}; known keys: "
                                 f"{', '.join(known)}", where=f"{where}.{key}")
    values = {k: _checked(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MicroArchError(f"{where}: missing key {missing[0]!r}", where=f"{where}.{missing[0]}")
    if cls is ModelConfig and "defaults" in values:  # roles not named keep their built-in blocks
        given = {role.lower() for role in values["defaults"]}
        builtin = {r: t for r, t in ModelConfig().defaults.items() if r.lower() not in given}
        values["defaults"] = {**builtin, **values["defaults"]}
    obj = cls(**values)
    _validate(obj, where)
    return obj


def _validate(obj, where: str) -> None:
    def need(ok, key: str | tuple[str, ...], msg):
        """`key`, or the keys a rule ties together (the first is named; any of them may be blamed)."""
        keys = (key,) if isinstance(key, str) else key
        if not ok:
            raise MicroArchError(f"{where}.{keys[0]}: {msg}", where=tuple(f"{where}.{k}" for k in keys))

    check = getattr(obj, "check", None)
    if check is not None:
        check(need)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# --- files and overrides -----------------------------------------------------------------------


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise MicroArchError(f"{path}: no such config file")
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise yaml_error(path, text, err) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MicroArchError(f"{path}: the top level should be a mapping with model/data/train sections")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {seen[key] + 1}); keep one",
                    key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def yaml_error(path: Path, text: str, err: yaml.YAMLError) -> MicroArchError:
    """The parser's complaint at path:line:column, with the offending line and a caret under the column."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return MicroArchError(f"{path}: not valid YAML: {' '.join(str(err).split())}")
    problem = err.problem or "cannot parse this"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None and (start.line, start.column) != (mark.line, mark.column):
        problem += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    elif context:
        problem += f" ({context})"
    lines = text.splitlines()
    shown = lines[mark.line].replace("\t", " ") if mark.line < len(lines) else ""
    return MicroArchError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}\n"
                          f"    {shown}\n    {' ' * mark.column}^")


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: Path, _seen: tuple = ()) -> dict:
    """Read a config file, merging the parents named by `extends:` (relative to the file)."""
    path = path.resolve()
    if path in _seen:
        raise MicroArchError(f"{path}: `extends` forms a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = _extended(path, parent)
    if not parent_path.is_file():
        raise MicroArchError(f"{path}: extends {parent!r}, but {parent_path} does not exist")
    return deep_merge(load_raw(parent_path, _seen + (path,)), data)


def _extended(path: Path, parent: str) -> Path:
    """The config file `extends: parent` names in `path`: relative to it, a folder meaning its config.yaml."""
    parent_path = (path.parent / parent).resolve()
    return parent_path / "config.yaml" if parent_path.is_dir() else parent_path


def parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict, dotted: str, value) -> None:
    """Set `model.layers.0.repeat`-style paths in a raw config dict (list indices are integers)."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise MicroArchError(f"override {dotted!r}: {where!r} needs an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise MicroArchError(f"override {dotted!r}: {'.'.join(parts[:i])!r} is a value, not a section")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise MicroArchError(f"override {item!r} should look like key=value, e.g. train.max_steps=200")
        key, text = item.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise MicroArchError(f"override {item!r}: the key {key.strip()!r} has an empty part; write dotted "
                                 "keys such as train.max_steps=200 or model.layers.0.repeat=2")
        set_dotted(data, key.strip(), parse_value(text))
    return data


def materialise_defaults(data: dict) -> dict:
    """Fill in default sections so that list-index overrides like model.layers.0.repeat find something."""
    full = to_dict(ExperimentConfig())
    return deep_merge(full, data)


def experiment_path(target: str | Path) -> Path:
    """An experiment folder or a config file -> the config file."""
    path = Path(target)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise MicroArchError(f"{target}: no experiment here; expected a folder with config.yaml "
                             "(e.g. experiments/shakespeare-char) or a .yaml file")
    return path


def extends_chain(path: Path) -> list[Path]:
    """The config files a config is merged from, the furthest `extends:` parent first and `path` last. A
    missing parent or a cycle ends the chain here; load_raw reports them."""
    chain = [Path(path).resolve()]
    while True:
        try:
            parent = read_yaml(chain[0]).get("extends")
        except MicroArchError:
            return chain
        if parent is None:
            return chain
        parent_path = _extended(chain[0], parent)
        if not parent_path.is_file() or parent_path in chain:
            return chain
        chain.insert(0, parent_path)


def load_config(target: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Experiment folder (or YAML file) + `--set` overrides -> validated ExperimentConfig."""
    path = experiment_path(target)
    data = load_raw(path)
    empty = not data
    if overrides:
        data = apply_overrides(materialise_defaults(data) if any(".layers." in o for o in overrides)
                               else data, overrides)
    try:
        cfg = from_dict(ExperimentConfig, data, where=str(path))
    except MicroArchError as err:
        raise blame(err, overrides, path) from None
    if not cfg.name:
        cfg.name = path.parent.name if path.name == "config.yaml" else path.stem
    if empty:
        warn_all_defaults(path, cfg)
    return cfg


_warned: set[Path] = set()


def warn_all_defaults(path: Path, cfg: ExperimentConfig) -> None:
    """An empty config file is most likely a mistake: say once what running it means."""
    if path in _warned:
        return
    _warned.add(path)
    t = cfg.train
    print(f"warning: {path} is empty, so every default is used: {t.max_steps} steps of {t.batch_size} x "
          f"{t.seq_len} tokens on {cfg.data.source!r}, {sum(g.repeat for g in cfg.model.layers)} layers of "
          f"d_model {cfg.model.d_model}; set keys in the file (or --set train.max_steps=N ...) to change that",
          file=sys.stderr)


def _bracketed(dotted: str) -> str:
    """model.layers.0.spec -> model.layers[0].spec, as config errors name places."""
    out = ""
    for part in dotted.split("."):
        out += f"[{part}]" if part.lstrip("-").isdigit() else (f".{part}" if out else part)
    return out


def _relative(text: str, root: str) -> str:
    return text[len(root):].lstrip(".") if root and text.startswith(root) else text


def _under(place: str, key: str) -> bool:
    """Is config place `place` (bracketed: model.layers[0].spec) the key `key` or inside it?"""
    return place == key or place.startswith((key + ".", key + "["))


def blame_override(err: MicroArchError, overrides: list[str] | None, root: str = "") -> MicroArchError:
    """The same error, reported against the last `--set` override that set a key it is about (or
    a section holding it), rather than against the config file; unchanged when no override did."""
    if not overrides or not err.places:
        return err
    places = [_relative(p, root) for p in err.places]
    message = _relative(str(err), root)
    for item in reversed(overrides):
        key = _bracketed(item.split("=", 1)[0].strip())
        if any(_under(place, key) for place in places):  # same class and fields; blamed once
            return err.reworded(f"--set {item}: {message}", where=None)
    return err


def key_origins(path: Path) -> dict[str, int]:
    """Which file of `path`'s extends chain (its index in extends_chain) set each key last: dotted keys of
    every section and value (list items are not entered: a list is replaced whole by the file that sets it)."""
    origins: dict[str, int] = {}

    def walk(node: dict, prefix: str, index: int) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            origins[dotted] = index
            if isinstance(value, dict):
                walk(value, dotted, index)

    for index, file in enumerate(extends_chain(path)):
        with contextlib.suppress(MicroArchError):
            walk({k: v for k, v in read_yaml(file).items() if k != "extends"}, "", index)
    return origins


def _origin(place: str, origins: dict[str, int]) -> int | None:
    """The file index of the longest key that holds `place` (model.layers[0].spec -> model.layers)."""
    found = [(len(key), index) for key, index in origins.items() if _under(place, _bracketed(key))]
    return max(found)[1] if found else None


def _shown(path: Path) -> str:
    """A path as the user would write it: relative to the working folder when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def blame(err: MicroArchError, overrides: list[str] | None, path: Path) -> MicroArchError:
    """`err` (about the config of `path`) reported against what set its key: the last `--set` override that
    did, else the file of the `extends` chain that set it last (a parent's unknown key names the parent), else
    `path` itself. The message then starts with that override or file."""
    root = str(path)
    blamed = blame_override(err, overrides, root)
    if blamed is not err:
        return blamed
    chain, origins = extends_chain(path), key_origins(path)
    found = [i for p in err.places if (i := _origin(_relative(p, root), origins)) is not None]
    last = max(found, default=len(chain) - 1)  # of keys tied together, the file that set one last
    file = root if last == len(chain) - 1 else _shown(chain[last])
    message = str(err)
    if message.startswith(root):
        message = file + message[len(root):]
    elif not message.startswith(file):
        message = f"{file}: {message}"
    return err.reworded(message, where=tuple(file + p[len(root):] if p.startswith(root) else p
                                             for p in err.places))


def dotted(data: dict, prefix: str = "", whole: tuple[str, ...] = ()) -> dict:
    """A nested config dict as {"model.defaults.Norm": "rmsnorm", ...}; lists, empty mappings and the keys
    named in `whole` (e.g. "defaults": model.defaults as one value) stay whole values."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key not in whole:
            out.update(dotted(value, f"{prefix}{key}.", whole))
        else:
            out[prefix + key] = value
    return out
