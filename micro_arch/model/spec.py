"""The block-string language: `Norm->Attn(n_kv_heads=1)->+->Norm->MLP->+`.

Parsing turns a string into steps (block calls and residual adds); resolving maps role names
(Norm, Attn, MLP, MoE, Mamba) through the experiment's `model.defaults` to registered blocks and
checks every argument against the block's constructor. Errors point at the token with a caret.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from micro_arch.errors import MicroArchError, closest
from micro_arch.model import registry

ADD = "+"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\Z")  # YAML 1.1 reads 1e-6 as a string


@dataclass
class BlockCall:
    name: str
    kwargs: dict = field(default_factory=dict)
    position: int = 0  # character offset in the spec string, for error carets
    text: str = field(default="", compare=False, repr=False)  # the whole spec string it came from
    arg_positions: dict = field(default_factory=dict, compare=False, repr=False)  # argument -> offset

    def __str__(self):
        if not self.kwargs:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


Step = BlockCall | str  # a BlockCall, or ADD


def spec_error(text: str, position: int, message: str, cause: MicroArchError | None = None) -> MicroArchError:
    """`message`, then the string with a caret under `position`; of `cause`'s class and fields when given (a
    BlockArgumentError stays one, with its block and argument)."""
    located = f"{message}\n    {text}\n    {' ' * position}^"
    return cause.reworded(located) if cause is not None else MicroArchError(located)


def _argument_position(call: BlockCall, err: MicroArchError) -> int:
    """Where to put the caret for an error about `call`: under the argument the error names (a
    BlockArgumentError's field), when the string wrote it; else under the block's name."""
    argument = getattr(err, "argument", None)
    return call.arg_positions.get(argument, call.position)


def _split_top_level(text: str, sep: str, base: int, whole: str) -> list[tuple[str, int]]:
    """Split on `sep` outside parentheses and quotes; returns (piece, absolute offset) pairs."""
    pieces, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise spec_error(whole, base + i, "bad block string: ')' without a matching '('")
        elif depth == 0 and text.startswith(sep, i):
            pieces.append((text[start:i], base + start))
            start = i + len(sep)
            i += len(sep)
            continue
        i += 1
    if quote:
        raise spec_error(whole, base + len(text), f"bad block string: unclosed quote {quote}")
    if depth > 0:
        raise spec_error(whole, base + text.rfind("("), "bad block string: '(' is never closed")
    pieces.append((text[start:], base + start))
    return pieces


def _parse_token(raw: str, offset: int, whole: str) -> Step:
    lead = len(raw) - len(raw.lstrip())
    token, offset = raw.strip(), offset + lead
    if not token:
        raise spec_error(whole, offset, "bad block string: missing block between arrows "
                         "(write e.g. 'Norm->Attn->+')")
    if token == ADD:
        return ADD
    name, args = token, ""
    if "(" in token:
        name, args = token.split("(", 1)
        if not token.endswith(")"):
            raise spec_error(whole, offset + len(token) - 1, f"bad block string: text after ')' in {token!r}")
        args = args[:-1]
    name = name.strip()
    if not _NAME.match(name):
        raise spec_error(whole, offset, f"bad block string: {name!r} is not a block name "
                         "(letters, digits and _, e.g. Attn or swiglu) nor '+'")
    kwargs, arg_positions = {}, {}
    args_at = offset + token.find("(") + 1
    for item, at in _split_top_level(args, ",", args_at, whole) if args.strip() else []:
        if "=" not in item:
            raise spec_error(whole, at, f"bad block string: argument {item.strip()!r} of {name} needs "
                             "a name: write key=value, e.g. Attn(n_kv_heads=1)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not _NAME.match(key):
            raise spec_error(whole, at, f"bad block string: {key!r} is not an argument name")
        if key in kwargs:
            raise spec_error(whole, at + len(item) - len(item.lstrip()), f"bad block string: argument {key} of "
                             f"{name} is given twice (first at column {arg_positions[key] + 1}); keep one")
        if not value.strip():
            raise spec_error(whole, at + item.index("=") + 1, f"bad block string: argument {key} of {name} has an "
                             "empty value; write a value, or null for None (e.g. n_kv_heads=null)")
        arg_positions[key] = at + len(item) - len(item.lstrip())
        try:
            kwargs[key] = yaml.safe_load(value)
            if _EXP_FLOAT.match(value.strip()):
                kwargs[key] = float(value)
        except yaml.YAMLError:
            raise spec_error(whole, at, f"bad block string: value {value.strip()!r} of {key} is not a "
                             "YAML scalar (int, float, bool or string)") from None
        if isinstance(kwargs[key], (list, dict)):
            raise spec_error(whole, at, f"bad block string: value of {key} must be a scalar, not a "
                             f"{type(kwargs[key]).__name__}")
    return BlockCall(name, kwargs, offset, whole, arg_positions)


def parse_chain(text: str) -> list[Step]:
    """A block string -> its steps; syntax errors only (names are checked by `resolve_chain`)."""
    if not isinstance(text, str):
        raise MicroArchError(f"a block string must be text like 'Norm->Attn->+', got {text!r}")
    if not text.strip():
        raise MicroArchError("bad block string: empty; write e.g. 'Norm->Attn->+->Norm->MLP->+'")
    steps = [_parse_token(raw, at, text) for raw, at in _split_top_level(text, "->", 0, text)]
    since_block = 0
    for step, (_, at) in zip(steps, _split_top_level(text, "->", 0, text)):
        if step == ADD and since_block == 0:
            raise spec_error(text, at + 1 if text[at:at + 1] == " " else at,
                             "bad block string: '+' must follow a block: it adds the branch to the stream")
        since_block = 0 if step == ADD else since_block + 1
    return steps


def _role_table(defaults: dict[str, str]) -> dict[str, str]:
    return {role.lower(): target for role, target in defaults.items()}


def resolve_call(call: BlockCall, defaults: dict[str, str], text: str) -> BlockCall:
    """Map a role name through `defaults` to a registered block, merge arguments, and check them."""
    roles = _role_table(defaults)
    name, kwargs = call.name, dict(call.kwargs)
    if name.lower() in roles:
        target = roles[name.lower()]
        try:
            (resolved,) = parse_chain(target)
        except (MicroArchError, ValueError):
            raise spec_error(text, call.position, f"model.defaults: role {name!r} maps to {target!r}, which "
                             "is not a single block such as 'rmsnorm' or 'attention(qk_norm=true)'") from None
        is_block = resolved != ADD and resolved.name.lower() in {e.name for e in registry.list_blocks()}
        if resolved == ADD or (resolved.name.lower() in roles and not is_block):  # 'Mamba: mamba' is fine
            raise spec_error(text, call.position, f"model.defaults: role {name!r} must map to a registered "
                             f"block, not {target!r}")
        name, kwargs = resolved.name, {**resolved.kwargs, **kwargs}
    known = {e.name for e in registry.list_blocks()}
    if name.lower() not in known:
        options = sorted(known | {r for r in defaults})
        raise spec_error(text, call.position, f"bad block string: unknown block {call.name!r}"
                         f"{closest(call.name, options)}; roles: {', '.join(defaults)}; "
                         "`micro-arch blocks` lists the registered blocks")
    try:
        registry.check_arguments(name, kwargs)
    except MicroArchError as err:
        raise spec_error(text, _argument_position(call, err), f"bad block string: {err}", err) from None
    return BlockCall(name.lower(), kwargs, call.position, call.text, call.arg_positions)


def resolve_chain(text: str, defaults: dict[str, str]) -> list[Step]:
    return [s if s == ADD else resolve_call(s, defaults, text) for s in parse_chain(text)]


def branch_where(where: str, spec: str | list[str], index: int) -> str:
    """model.layers[0].spec, or model.layers[0].spec[1] for the second of a list of branches."""
    return f"{where}[{index}]" if isinstance(spec, list) else where


def resolve_layer(spec: str | list[str], defaults: dict[str, str], where: str = "spec") -> list[list[Step]]:
    """A layer spec (one string or a list of parallel branches) -> resolved steps per branch; errors
    start with `where` (and the branch's index in a list)."""
    branches = spec if isinstance(spec, list) else [spec]
    if not branches:
        raise MicroArchError(f"{where}: a layer's list of parallel branches is empty", where=where)
    resolved = []
    for i, branch in enumerate(branches):
        at = branch_where(where, spec, i)
        try:
            resolved.append(resolve_chain(branch, defaults))
        except MicroArchError as err:
            raise err.reworded(f"{at}: {err}", where=at) from None
    return resolved


def build_step(call: BlockCall, dims, where: str = ""):
    """Construct a resolved block; when the block refuses its arguments, the error points at the
    argument it names (its BlockArgumentError's field; else at the block) in the spec string, prefixed
    with `where`."""
    try:
        return registry.build_block(call.name, dims, **call.kwargs)
    except MicroArchError as err:
        if not call.text:
            raise
        located = spec_error(call.text, _argument_position(call, err), f"bad block string: {err}", err)
        raise located.reworded(f"{where}: {located}" if where else str(located), where=where or None) from None


def format_chain(steps: list[Step]) -> str:
    return "->".join(str(s) for s in steps)
