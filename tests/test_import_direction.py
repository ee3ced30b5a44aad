"""Imports run one way: ground floor -> data, models -> distillers -> strategies -> engine -> experiments -> cli,
and no module imports itself back in a circle at import time (issue 20: staged <-> auto_staged was one)."""
from __future__ import annotations

import ast
from pathlib import Path

import adakd

PACKAGE = Path(adakd.__file__).parent
GROUND = {"adakd", "registry", "ranks", "modes", "numerics", "download", "options", "rotations"}
# Each room and the rooms it may import (the ground floor always).
ALLOWED = {
    "data": set(),
    "models": set(),
    "distillers": {"models"},
    "strategies": {"models", "distillers"},
    "engine": {"data", "models", "distillers", "strategies"},
    "experiments": {"data", "models", "distillers", "strategies", "engine"},
    "cli": {"data", "models", "distillers", "strategies", "engine", "experiments"},
    "__main__": {"cli"},
    "grids": set(),  # data files with an index
    "presets": set(),
}


def module_name(path: Path) -> str:
    """adakd.engine.build for .../adakd/engine/build.py; adakd.models for .../adakd/models/__init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("adakd", *parts)).removesuffix(".__init__")


def room(module: str) -> str:
    """The room of a module: adakd.engine.build -> engine, adakd.ranks -> ranks, adakd -> adakd."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "adakd"


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The adakd modules `path` imports (anywhere, or only in statements that run at import time)."""
    tree = ast.parse(path.read_text())
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "adakd":
            for alias in node.names:  # `from adakd.models import staged` may name a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "adakd"}
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(path) for path in FILES}


def test_every_room_imports_only_the_rooms_below_it():
    wrong = []
    for path in FILES:
        source = room(module_name(path))
        allowed = GROUND | ALLOWED.get(source, set()) | {source}  # the ground floor imports only itself
        for target in imports(path, top_level_only=False):
            if room(target) not in allowed:
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, wrong


def test_no_import_circle_at_import_time():
    graph = {module_name(path): {m for m in imports(path, top_level_only=True) if m in MODULES}
             for path in FILES}
    # A package's __init__ importing its own submodules is how registries fill; the circle that matters is between
    # sibling modules, so a package is not an edge target for its own submodules.
    for module, targets in graph.items():
        targets -= {t for t in targets if module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, stack: list[str]) -> bool:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle.extend(stack[stack.index(target):] + [module, target] if target in stack else [module, target])
                return True
            if state.get(target) is None and visit(target, stack + [module]):
                return True
        state[module] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if state.get(m) is None), " -> ".join(cycle)
