"""The package's shape: sub-packages stand on floors and import only downwards (counting imports inside
functions), modules import each other without a cycle, and every module reads in one sitting.

The floors are docs/code.md's map; a package may import its own modules and those of lower floors only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minigpt"
MAX_LINES = 600

# Lowest first; packages on one floor do not import each other. cli/ (the commands) stands on top of the library,
# and __main__.py on top of everything.
FLOORS = [
    ["common"],
    ["text", "model"],
    ["runs"],
    ["data"],
    ["chat"],
    ["eval"],
    ["plan"],
    ["train"],
    ["serve", "interop"],
    ["quickstart"],
    ["cli"],
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}
TOP = len(FLOORS)


def module_name(path: Path) -> str:
    """minigpt/text/corpus.py -> text.corpus; minigpt/common/__init__.py -> common; minigpt/__main__.py -> __main__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the minigpt modules it imports anywhere in its file (top level or inside functions)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] != "minigpt":
                    continue
                base = ".".join(parts[1:])
                for alias in node.names:  # from minigpt.text import corpus: the module text.corpus
                    full = f"{base}.{alias.name}" if base else alias.name
                    edges.add(full if full in known else base)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "minigpt" and len(parts) > 1:
                        edges.add(".".join(parts[1:]))
        graph[name] = {m for m in edges if m in known and m != name}
    return graph


def package_of(module: str) -> str:
    return module.split(".")[0]


def floor_of(module: str) -> int:
    return FLOOR.get(package_of(module), TOP)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_modules_import_each_other_one_way():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_every_package_stands_on_a_documented_floor():
    packages = {package_of(m) for m, p in modules().items() if p.parent != PACKAGE}
    assert packages == set(FLOOR), f"packages without a floor: {packages - set(FLOOR)}; gone: {set(FLOOR) - packages}"
    code_md = (ROOT / "docs" / "code.md").read_text()
    for package in FLOOR:
        assert re.search(rf"\bminigpt/{package}/ ", code_md), f"docs/code.md does not map minigpt/{package}/"


def test_imports_run_down_the_floors():
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if package_of(a) != package_of(b) and floor_of(b) >= floor_of(a) and floor_of(b) < TOP)
    assert not upward, f"imports that do not run down the floors: {upward}"


def test_the_checks_would_catch_a_mistake():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert floor_of("data.prepare") > floor_of("text.corpus") and floor_of("cli.train") == TOP - 1
    assert floor_of("__main__") == TOP


def test_every_module_reads_in_one_sitting():
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_each_command_is_the_cli_module_of_its_name_and_only_there():
    """`minigpt STAGE` is minigpt/cli/STAGE.py (import_.py for `import`); no library module parses a command line
    (common/config.py turns settings into flags for the commands, and parses none)."""
    from minigpt.cli import STAGES, command_module

    for stage, _ in STAGES:
        tree = ast.parse((PACKAGE / "cli" / f"{command_module(stage)}.py").read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert {"add_arguments", "main"} <= defined, stage
    library = {name: path for name, path in modules().items() if package_of(name) not in ("cli", "__main__")}
    for name, path in library.items():
        tree = ast.parse(path.read_text())
        entry = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)} & {"main", "add_arguments"}
        assert not entry - ({"add_arguments"} if name == "common.config" else set()), f"{name} defines {entry}"
        assert "parse_args(" not in path.read_text(), f"{name} parses a command line"
