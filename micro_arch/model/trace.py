"""`micro-arch trace`: run one forward pass with hooks and show how shapes flow through every module.

Each module gets a node with its input and output shapes and parameter count; blocks report the
tensors inside them (q, k, v, the SDPA scores, router logits, SSM states) through `state.record`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.tree import Tree

from micro_arch.model.model import Model
from micro_arch.model.state import BlockState


@dataclass
class Node:
    name: str
    kind: str
    params: int
    extra: str = ""
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    records: list = field(default_factory=list)  # (name, shape, dtype) reported from inside the block
    children: list = field(default_factory=list)


def _shapes(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [(tuple(obj.shape), str(obj.dtype).replace("torch.", ""))]
    if isinstance(obj, (list, tuple)):
        return [s for o in obj for s in _shapes(o)]
    if hasattr(obj, "logits"):
        return _shapes(obj.logits)
    return []


def _extra(module) -> str:
    if isinstance(module, torch.nn.Linear):
        return f"{module.in_features}->{module.out_features}" + ("" if module.bias is None else " +bias")
    if isinstance(module, torch.nn.Embedding):
        return f"{module.num_embeddings}x{module.embedding_dim}"
    return module.extra_repr()


def _hidden(node: Node) -> bool:
    """Containers that never run themselves, and dropouts that do nothing, only add noise to the tree."""
    return (node.kind in ("ModuleList", "ModuleDict") and not node.inputs) or node.extra.startswith("p=0.0,")


def trace_model(model: Model, idx: torch.Tensor) -> Node:
    """Run `model(idx)` once and return the tree of modules with the shapes each one saw."""
    nodes, stack, handles = {}, [], []
    for name, module in model.named_modules():
        extra = _extra(module)
        nodes[module] = Node(name or "model", type(module).__name__,
                             sum(p.numel() for p in module.parameters()), extra)
        parent = name.rsplit(".", 1)[0] if "." in name else ("" if name else None)
        if parent is not None:
            nodes[model.get_submodule(parent) if parent else model].children.append(nodes[module])

    def pre(module, args):
        stack.append(nodes[module])
        if not nodes[module].inputs:
            nodes[module].inputs = _shapes(args[:1])

    def post(module, args, output):
        stack.pop()
        if not nodes[module].outputs:
            nodes[module].outputs = _shapes(output)

    def record(name, tensor):
        stack[-1].records.append((name, tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")))

    for module in nodes:
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(idx, state=BlockState(recorder=record))
    finally:
        for h in handles:
            h.remove()
    return nodes[model]


def _fmt_shapes(shapes) -> str:
    return ", ".join(str(s) if d in ("float32", "int64") else f"{s} {d}" for s, d in shapes) or "-"


def _fmt_params(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(root: Node, depth: int | None = None) -> Tree:
    def label(node: Node, parent: str) -> str:
        short = node.name[len(parent) + 1:] if parent else node.name
        text = f"[bold]{short}[/] [cyan]{node.kind}[/]"
        if node.extra:
            text += f" [dim]{node.extra}[/]"
        text += f"  {_fmt_shapes(node.inputs)} -> [green]{_fmt_shapes(node.outputs)}[/]"
        if node.params:
            text += f"  [magenta]{_fmt_params(node.params)} params[/]"
        return text

    def add(tree: Tree, node: Node, level: int, shown: str):
        for rec_name, shape, dtype in node.records:
            tree.add(f"[yellow]· {rec_name}[/] {shape}" + ("" if dtype == "float32" else f" {dtype}"))
        if depth is not None and level >= depth:
            return
        for child in node.children:
            if _hidden(child):
                add(tree, child, level, shown)
            else:
                add(tree.add(label(child, shown)), child, level + 1, child.name)

    tree = Tree(label(root, ""))
    add(tree, root, 0, "")
    return tree


def trace_text(tree: Tree, width: int = 160) -> str:
    """The tree as plain text, for trace.txt."""
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(tree)
    return console.export_text()
