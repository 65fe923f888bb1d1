"""The block registry, in the spirit of timm's: a decorator registers, `list_blocks` filters, `build_block` builds.

Blocks come from three places: the built-in `blocks/` folder (installed as `micro_arch.blocks`), an experiment's own `blocks.py`,
and installed packages that declare the entry-point group `micro_arch.blocks`.

A block string's arguments are checked before the block is built, against the constructor's annotations: the
type, and the bounds declared beside the argument with annotated-types (`eps: Annotated[float, Gt(0)] = 1e-5`,
as pydantic reads them). An argument named like a shared dimension (`Attn(n_kv_heads=1)`) also gets that
dimension's own rules (`Dims`), the same as the model's key: `Attn(n_kv_heads=0)` is refused like
`model.n_kv_heads: 0`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal

import annotated_types as at
from torch import nn

from micro_arch.errors import BlockArgumentError, MicroArchError, closest

KINDS = ("norm", "attention", "mlp", "moe", "ssm", "other")
ENTRY_POINT_GROUP = "micro_arch.blocks"
BUILTIN_BLOCKS = "micro_arch.blocks"  # the top-level blocks/ folder, installed under the package


@dataclass(frozen=True)
class Dims:
    """The model's shared dimensions; a block receives those its constructor names. The bounds are the model
    keys' (config.ModelConfig, tests/test_registry.py checks they agree) and apply as well to a block-string
    argument of the same name."""

    d_model: Annotated[int, at.Ge(1)]
    n_heads: Annotated[int, at.Ge(1)] = 1
    n_kv_heads: Annotated[int | None, at.Ge(1)] = None
    head_dim: Annotated[int | None, at.Ge(1)] = None
    d_ff: Annotated[int | None, at.Ge(1)] = None
    max_seq_len: Annotated[int, at.Ge(1)] = 1024
    dropout: Annotated[float, at.Interval(ge=0, lt=1)] = 0.0
    n_layers: Annotated[int, at.Ge(1)] = 1
    layer_idx: Annotated[int, at.Ge(0)] = 0
    positions: Literal["rope", "learned", "none"] = "rope"
    rope_theta: Annotated[float, at.Gt(0)] = 10000.0
    rope_scaling: Annotated[float, at.Gt(0)] = 1.0


DIM_NAMES = tuple(f.name for f in fields(Dims))
DIM_RULES = typing.get_type_hints(Dims, include_extras=True)


@dataclass(frozen=True)
class BlockEntry:
    name: str
    cls: type
    kind: str
    source: str

    @property
    def arguments(self) -> dict[str, inspect.Parameter]:
        """Constructor arguments a spec may set (everything but self and *args/**kwargs)."""
        params = inspect.signature(self.cls.__init__).parameters
        return {
            n: p
            for n, p in params.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def bounds_of(self, argument: str) -> str:
        """The bounds an argument must keep, in short ('> 0', '>= 1'): its own and a shared dimension's."""
        return ", ".join(filter(None, (bound_symbols(a) for a in rules_of(self, argument))))

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, BlockEntry] = {}


def register_block(name: str, kind: str = "other"):
    """Class decorator: `@register_block("swiglu", kind="mlp")`. Names are case-insensitive."""
    if kind not in KINDS:
        raise MicroArchError(f"register_block({name!r}): kind {kind!r} is not one of {', '.join(KINDS)}")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise MicroArchError(f"register_block({name!r}): {cls!r} is not an nn.Module subclass")
        key = name.lower()
        source = inspect.getsourcefile(cls) or cls.__module__
        old = _REGISTRY.get(key)
        if old is not None and (old.source, old.cls.__qualname__) != (source, cls.__qualname__) \
                and not _same_definition(old, cls, source):
            raise MicroArchError(
                f"block name {name!r} is registered twice: by {old.cls.__qualname__} in {old.source} "
                f"and by {cls.__qualname__} in {source}; rename one of them"
            )
        _REGISTRY[key] = BlockEntry(key, cls, kind, source)
        return cls

    return decorate


def _same_definition(old: BlockEntry, cls: type, source: str) -> bool:
    """The same class from a copy of the same file: a run directory keeps a copy of its experiment's
    blocks.py, and a process may load both (a sweep evaluating its trials, compare over several runs)."""
    if old.cls.__qualname__ != cls.__qualname__:
        return False
    try:
        return Path(old.source).read_bytes() == Path(source).read_bytes()
    except OSError:
        return False


def get_entry(name: str) -> BlockEntry:
    load_all()
    entry = _REGISTRY.get(name.lower())
    if entry is None:
        raise MicroArchError(f"unknown block {name!r}{closest(name, _REGISTRY)}; `micro-arch blocks` lists them all")
    return entry


def list_blocks(pattern: str = "*", kind: str | None = None) -> list[BlockEntry]:
    """Registered blocks whose name matches the wildcard `pattern` (and `kind`, if given), sorted by kind, name."""
    load_all()
    if kind is not None and kind not in KINDS:
        raise MicroArchError(f"unknown block kind {kind!r}; kinds are {', '.join(KINDS)}")
    found = [
        e
        for e in _REGISTRY.values()
        if fnmatch.fnmatch(e.name, pattern.lower()) and (kind is None or e.kind == kind)
    ]
    return sorted(found, key=lambda e: (KINDS.index(e.kind), e.name))


def _type_ok(value, annotation) -> bool:
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return True
    if isinstance(annotation, str):  # postponed annotations: resolve the simple ones
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation.split("|")[0].strip())
        if annotation is None:
            return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_ok(value, typing.get_args(annotation)[0])
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# --- bounds declared with annotated-types --------------------------------------------------------

_CHECKS = {  # annotated-types' metadata this registry enforces: attribute -> (test, words, symbol)
    "gt": (lambda v, b: v > b, "greater than {}", "> {}"),
    "ge": (lambda v, b: v >= b, "at least {}", ">= {}"),
    "lt": (lambda v, b: v < b, "less than {}", "< {}"),
    "le": (lambda v, b: v <= b, "at most {}", "<= {}"),
    "multiple_of": (lambda v, b: v % b == 0, "a multiple of {}", "multiple of {}"),
}


def bounds(annotation) -> list[tuple[str, object]]:
    """The (kind, bound) pairs declared in `annotation`: `Annotated[int | None, Ge(1)]` -> [('ge', 1)]; an
    Interval gives one pair per side; `Annotated[int, Ge(1)] | None` works as well."""
    found = []
    if typing.get_origin(annotation) is Annotated:
        for meta in annotation.__metadata__:
            for item in (meta if isinstance(meta, at.GroupedMetadata) else [meta]):
                found += [(k, getattr(item, k)) for k in _CHECKS if getattr(item, k, None) is not None]
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found += bounds(arg)
    return found


def allowed(annotation) -> str:
    """What `annotation`'s bounds allow, in words: 'at least 1 (or null)', 'in [0, 1)'."""
    pairs = dict(bounds(annotation))
    low = next((k for k in ("gt", "ge") if k in pairs), None)
    high = next((k for k in ("lt", "le") if k in pairs), None)
    parts = []
    if low and high:  # both sides: an interval
        parts.append(f"in {'(' if low == 'gt' else '['}{pairs.pop(low)}, {pairs.pop(high)}"
                     f"{')' if high == 'lt' else ']'}")
    parts += [_CHECKS[k][1].format(b) for k, b in pairs.items()]
    return " and ".join(parts) + (" (or null)" if _type_ok(None, annotation) else "")


def bound_symbols(annotation) -> str:
    """The bounds in short, for `micro-arch blocks`: '> 0', '>= 0, < 1'."""
    return ", ".join(_CHECKS[k][2].format(b) for k, b in bounds(annotation))


def _breaks(value, annotation) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False  # the type check speaks about these
    return any(not _CHECKS[k][0](value, b) for k, b in bounds(annotation))


# --- checking and building -------------------------------------------------------------------------

def rules_of(entry: BlockEntry, argument: str) -> list:
    """The annotations an argument must satisfy: the constructor's own, and a shared dimension's rules for an
    argument named like one."""
    own = _hints(entry.cls).get(argument, entry.arguments[argument].annotation)
    return [own] + ([DIM_RULES[argument]] if argument in DIM_RULES else [])


def check_arguments(name: str, kwargs: dict) -> BlockEntry:
    """Validate keyword arguments against the block's constructor: names, types and declared bounds (and the
    shared dimensions' rules); a BlockArgumentError naming the block and the argument otherwise."""
    entry = get_entry(name)
    accepted = entry.arguments
    for key, value in kwargs.items():
        if key not in accepted:
            settable = [a for a in accepted if a not in DIM_NAMES] + [a for a in accepted if a in DIM_NAMES]
            raise BlockArgumentError(
                f"block {entry.name!r} takes no argument {key!r}{closest(key, accepted)}; "
                f"it takes: {', '.join(settable) or 'no arguments'}", argument=key, block=entry.name)
        for annotation in rules_of(entry, key):
            if not _type_ok(value, annotation):
                raise BlockArgumentError(
                    f"block {entry.name!r}: argument {key}={value!r} should be {_type_name(annotation)}, "
                    f"not {type(value).__name__}", argument=key, block=entry.name)
            if _breaks(value, annotation):
                raise BlockArgumentError(f"block {entry.name!r}: argument {key}={value!r} must be "
                                         f"{allowed(annotation)}", argument=key, block=entry.name)
    return entry


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:
        return {}


def build_block(name: str, dims: Dims, **kwargs) -> nn.Module:
    """Construct block `name`: shared dims fill the constructor arguments they name; kwargs override."""
    entry = check_arguments(name, kwargs)
    accepted = entry.arguments
    args = {k: getattr(dims, k) for k in DIM_NAMES if k in accepted}
    args.update(kwargs)
    missing = [n for n, p in accepted.items() if p.default is p.empty and n not in args]
    if missing:
        raise BlockArgumentError(f"block {entry.name!r} needs argument(s) {', '.join(missing)}; write e.g. "
                                 f"{entry.name}({missing[0]}=...)", argument=missing[0], block=entry.name)
    try:
        return entry.cls(**args)
    except BlockArgumentError as err:  # the block says which argument: keep it, name the block
        raise BlockArgumentError(f"block {entry.name!r} with {kwargs or 'default arguments'}: {err}",
                                 argument=err.argument, block=entry.name) from None
    except MicroArchError:
        raise
    except (ValueError, AssertionError) as err:  # which argument is not said: the whole block is blamed
        raise BlockArgumentError(f"block {entry.name!r} with {kwargs or 'default arguments'}: {err}",
                                 block=entry.name) from None


# --- loading ------------------------------------------------------------------------------------

_loaded_builtin = False


def load_all() -> None:
    """Load the blocks of every package that declares the entry-point group `micro_arch.blocks` (once per
    process). micro-arch's own built-ins come the same way (its pyproject names `micro_arch.blocks`), so this
    module imports no block and stays a leaf that every block can import."""
    global _loaded_builtin
    if _loaded_builtin:
        return
    _loaded_builtin = True
    plugins = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if not any(ep.value == BUILTIN_BLOCKS for ep in plugins):  # a source copy without installed metadata
        importlib.import_module(BUILTIN_BLOCKS)
    for ep in plugins:
        if ep.value == BUILTIN_BLOCKS:
            ep.load()  # a broken built-in is an error of ours: let it raise
            continue
        try:
            ep.load()
        except Exception as err:  # a broken plug-in should not take the built-ins down with it
            print(f"micro-arch: could not load blocks from entry point {ep.name} ({ep.value}): {err}",
                  file=sys.stderr)


def load_experiment_blocks(experiment_dir: str | Path) -> None:
    """Import `<experiment>/blocks.py` if there is one, so its @register_block classes exist; in a run
    directory also the copies of the blocks of the experiments its config extends (`blocks-extends-N.py`)."""
    load_all()
    folder = Path(experiment_dir)
    for path in [folder / "blocks.py", *sorted(folder.glob("blocks-extends-*.py"))]:
        if path.is_file():
            _load_blocks_file(path)


def _load_blocks_file(path: Path) -> None:
    """Import one blocks file, once per file (two experiment folders of the same name are two modules)."""
    resolved = path.resolve()
    stem = "".join(c if c.isalnum() else "_" for c in f"{resolved.parent.name}_{resolved.stem}")
    module_name = f"micro_arch_experiment_blocks.{stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except MicroArchError:
        del sys.modules[module_name]
        raise
    except Exception as err:
        del sys.modules[module_name]
        raise MicroArchError(f"{path}: could not import the experiment's blocks: {type(err).__name__}: {err}") \
            from err
