"""Inside `plugins/cvfp/` imports run top to bottom (docs/architecture.md): the recipe, then the phases,
then the solvers and stores they use, then the model and the contract. Read from the source, so an
import under TYPE_CHECKING or inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

CVFP = Path(__file__).parents[1] / "plugins" / "cvfp"
PACKAGE = "newllm_kit_plugins.cvfp"
LAYERS = [
    {"recipe"},
    {"decode", "flops", "phase1", "gradual_decrease", "split_phase1", "phase2", "checkpoint_fit"},
    {"jacobi_pass", "frozen_solve", "context_store", "phase1_contexts", "diagnostics", "spans",
     "solve_checkpoint"},
    {"model", "contract", "row_map"},
]
LAYER = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def sibling_imports(path: Path) -> set[str]:
    """The modules of the package that `path` imports, by module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith(f"{PACKAGE}."):
                name = module.removeprefix(f"{PACKAGE}.").split(".")[0]
                found |= {name} if name else {alias.name for alias in node.names}
            elif module == PACKAGE:
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix(f"{PACKAGE}.").split(".")[0] for alias in node.names
                      if alias.name.startswith(f"{PACKAGE}.")}
    return found


def graph() -> dict[str, set[str]]:
    return {path.stem: sibling_imports(path) for path in CVFP.glob("*.py") if path.stem != "__init__"}


def test_every_module_has_a_layer() -> None:
    assert set(graph()) == set(LAYER)


def test_no_module_imports_one_above_it() -> None:
    upward = {(name, used) for name, uses in graph().items() for used in uses if LAYER[used] < LAYER[name]}
    assert not upward


def test_no_import_cycle() -> None:
    edges = graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for used in edges[start] - seen:
            if used == goal or reaches(used, goal, seen | {used}):
                return True
        return False

    assert not [name for name in edges if reaches(name, name, set())]


def tree_imports() -> dict[str, set[str]]:
    """Every module of the core and the built-ins, with the modules of both it imports."""
    modules: dict[str, Path] = {}
    roots = ((CVFP.parents[1] / "newllm_kit", "newllm_kit"), (CVFP.parent, "newllm_kit_plugins"))
    for folder, package in roots:
        for path in folder.rglob("*.py"):
            if "templates" in path.parts:
                continue
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        base = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                parent = base[:len(base) - node.level + 1]
                target = ".".join([*parent, node.module or ""]).rstrip(".") if node.level else node.module or ""
                found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        # a package's __init__ re-exporting its own modules is not a dependency of those modules on it
        edges[name] = {used for used in found & set(modules) if used != name and not used.startswith(f"{name}.")}
    return edges


def test_the_core_never_imports_a_built_in() -> None:
    edges = tree_imports()
    assert len(edges) > 40  # the scan found the tree
    assert not {(name, used) for name, uses in edges.items() if name.split(".")[0] == "newllm_kit"
                for used in uses if used.startswith("newllm_kit_plugins")}


def test_no_import_cycle_in_the_core_or_the_built_ins() -> None:
    edges = tree_imports()

    def cycle_through(start: str) -> bool:
        stack, seen = list(edges[start]), set()
        while stack:
            name = stack.pop()
            if name == start:
                return True
            if name not in seen:
                seen.add(name)
                stack.extend(edges[name])
        return False

    assert not [name for name in edges if cycle_through(name)]
