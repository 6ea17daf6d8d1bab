"""The layering rule (docs/architecture.md): imports between top-level folders only go down.

Every ``import qfl.X`` / ``from qfl.X import …`` in the source tree, at any
depth (a lazy import inside a function is still a dependency), is an edge
between two *layers*. ``qfl/`` holds two layers: the base (``qfl.config``,
``qfl.files``, ``qfl.errors``, ``qfl.seeds``: plain data and helpers every
folder may use) and the command line (``qfl.cli``, which may use everything).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer and from layers before it.
LAYERS = ("base", "compression", "security", "quantum", "clients", "server", "simulations", "benchmarks", "cli")
FOLDERS = ("compression", "security", "quantum", "clients", "server", "simulations", "benchmarks")


def layer_of_module(module: str) -> str | None:
    """The layer of an installed module name (``qfl.server.app`` → ``server``)."""
    parts = module.split(".")
    if parts[0] != "qfl":
        return None
    if len(parts) == 1:
        return "base"
    if parts[1] in FOLDERS:
        return parts[1]
    return "cli" if parts[1] in ("cli", "__main__") else "base"


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "qfl":
        return "cli" if rel.stem in ("cli", "__main__") else "base"
    return rel.parts[0]


def package_of_file(path: Path) -> str:
    """The installed package a source file belongs to, for resolving relative imports."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "qfl":
        return ".".join(("qfl", *rel.parts[1:-1]))
    return ".".join(("qfl", *rel.parts[:-1]))


def imports(path: Path) -> list[tuple[str, int]]:
    """Every qfl module ``path`` imports, with its line number."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of_file(path).split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
    return found


def edges() -> dict[tuple[str, str], list[str]]:
    """(from layer, to layer) → the offending ``file:line module`` lines."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for folder in ("qfl", *FOLDERS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            src = layer_of_file(path)
            for module, line in imports(path):
                dst = layer_of_module(module)
                if dst is not None and dst != src:
                    out[(src, dst)].append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
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


def test_no_cycle_between_top_level_folders():
    found = edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in found:
        graph[src].add(dst)
    cycle = find_cycle(graph)
    if cycle:
        lines = [f"import cycle between top-level folders: {' -> '.join(cycle)}"]
        for src, dst in zip(cycle, cycle[1:]):
            lines += [f"  {src} -> {dst}:"] + [f"    {x}" for x in found[(src, dst)]]
        raise AssertionError("\n".join(lines))


def test_imports_only_go_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = {(s, d): where for (s, d), where in edges().items() if rank[d] > rank[s]}
    assert not upward, "imports that go up a layer (order: " + " < ".join(LAYERS) + "):\n" + "\n".join(
        f"  {s} -> {d}:\n" + "\n".join(f"    {x}" for x in where) for (s, d), where in sorted(upward.items())
    )


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
