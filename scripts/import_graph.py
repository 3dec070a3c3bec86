"""The package's import graph: which captioner module imports which, the longest chain, and any cycle.

By default only module-level imports count: they run when a module is imported. With --all,
imports inside functions count too: they run only when called (the CLI's commands, gradio for
the UI), which is how a module avoids loading what it rarely needs, but a cycle through them is
still a circle of modules that depend on each other (tests/test_imports.py forbids one).

    python scripts/import_graph.py [--all] [PACKAGE_DIR]
"""
from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path


def graph(package: Path, inner: bool = False) -> dict[str, set[str]]:
    """module -> the package's modules it imports; inner: imports inside functions too."""
    names = {p.stem for p in package.glob("*.py")}
    edges = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree) if inner else tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        edges[path.stem] = {m.split(".")[0] for m in found} & names - {path.stem}
    return edges


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain (the graph must have no cycle)."""
    @functools.cache
    def chain(m: str) -> tuple[str, ...]:
        return (m, *max((chain(d) for d in edges[m]), key=len, default=()))

    return list(max((chain(m) for m in edges), key=len))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every strongly connected group of two or more modules (Tarjan), sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for d in sorted(edges[m]):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in on_stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            group = []
            while not group or group[-1] != m:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return sorted(groups)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    inner = "--all" in argv
    argv = [a for a in argv if a != "--all"]
    edges = graph(Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "captioner", inner)
    width = max(map(len, edges))
    for m, deps in sorted(edges.items()):
        print(f"{m:<{width}}  {' '.join(sorted(deps)) or '-'}")
    circles = cycles(edges)
    for group in circles:
        print(f"\nimport cycle of {len(group)} modules: {' '.join(group)}")
    chain = "" if circles else f"; longest chain: {' -> '.join(longest_chain(edges))}"
    print(f"\n{len(edges)} modules, {sum(map(len, edges.values()))} imports"
          f"{' (inside functions too)' if inner else ''}{chain}")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
