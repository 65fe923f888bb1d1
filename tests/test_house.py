"""The house rules, read from the source's own imports: no import cycle, argparse only in the command-line
layer, training stages decided only by their Stage objects, and nothing named `blocks` on a user's path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for micro_arch and the blocks/ folder installed as micro_arch.blocks."""
    modules = {}
    for base, prefix in ((ROOT / "micro_arch", "micro_arch"), (ROOT / "blocks", "micro_arch.blocks")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at any depth of its code (a function-level import counts too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where only a.b is ours, etc.
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            found.add(target)
            # importing a.b.c first runs a.b's __init__, unless we are inside a.b already
            parent = target.rpartition(".")[0]
            while parent and parent in modules and not name.startswith(parent + ".") and parent != name:
                found.add(parent)
                parent = parent.rpartition(".")[0]
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    graph.pop("micro_arch.registry", None), graph.pop("micro_arch.state", None)  # deprecated aliases, leaves
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def room(name: str) -> str:
    """A module's folder (micro_arch.train, micro_arch.blocks) or top-level file (micro_arch.config)."""
    return ".".join(name.split(".")[:2])


def test_no_folder_imports_back_up():
    """Folders and top-level files form floors: no two import each other, even through different files, so
    the house reads from config to report without climbing back."""
    modules = project_modules()
    rooms: dict[str, set[str]] = {}
    for name, path in modules.items():
        for target in imports_of(name, path, modules):
            if room(name) != room(target) and target != "micro_arch":
                rooms.setdefault(room(name), set()).add(room(target))
    cycle = find_cycle(rooms)
    assert cycle is None, "folders that import each other: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_registry_is_a_leaf():
    modules = project_modules()
    ours = imports_of("micro_arch.model.registry", modules["micro_arch.model.registry"], modules)
    assert ours <= {"micro_arch.errors"}, ours


def test_only_the_command_line_layer_sees_argparse():
    offenders = []
    for name, path in project_modules().items():
        if name == "micro_arch.cli" or name.startswith("micro_arch.cli."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names) or \
                    isinstance(node, ast.ImportFrom) and node.module == "argparse":
                offenders.append(name)
    assert not offenders, f"argparse outside micro_arch.cli: {offenders}"


def stage_branches(path: Path) -> list[int]:
    """Lines that compare a training stage by name: `x.stage == "sft"`, `stage != 'pretrain'`, `stage in (...)`."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = {s.attr if isinstance(s, ast.Attribute) else getattr(s, "id", None) for s in sides}
            if names & {"stage"} and any(isinstance(s, (ast.Constant, ast.Tuple, ast.List, ast.Set)) for s in sides):
                lines.append(node.lineno)
    return lines


def test_no_stage_branch_outside_the_stage_objects():
    """What differs between stages is a property or method of its Stage object (micro_arch/stages/), so no code
    compares train.stage by name: a new stage is one new file."""
    found = {str(path.relative_to(ROOT)): lines for path in project_modules().values()
             if (lines := stage_branches(path))}
    assert not found, f"decide by the Stage object (micro_arch.stages.stage_of), not by name: {found}"


def test_stage_branch_finder_sees_a_branch(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("if cfg.train.stage == 'sft':\n    pass\nok = stage.is_chat\n")
    assert stage_branches(f) == [1]


def test_every_package_folder_is_installed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in project_modules().items() if path.name == "__init__.py"}
    assert listed == on_disk, f"pyproject's packages and the package folders differ: {listed ^ on_disk}"


@pytest.mark.parametrize("probe, expected", [
    ("import importlib.util; print(importlib.util.find_spec('blocks'))", "None"),
    ("import micro_arch.blocks, pathlib; print(pathlib.Path(micro_arch.blocks.__file__).parent.name)", "blocks"),
])
def test_no_top_level_blocks_package_on_the_path(tmp_path, probe, expected):
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
