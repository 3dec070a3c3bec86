"""The package's import graph: which captioner module imports which at import time, and the longest chain.

Imports inside functions are left out: they run only when called (the CLI's commands, gradio
for the UI), so they are how a module avoids loading what it rarely needs.

    python scripts/import_graph.py [PACKAGE_DIR]
"""
from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path


def graph(package: Path) -> dict[str, set[str]]:
    names = {p.stem for p in package.glob("*.py")}
    edges = {}
    for path in sorted(package.glob("*.py")):
        found = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        edges[path.stem] = {m.split(".")[0] for m in found} & names - {path.stem}
    return edges


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    @functools.cache
    def chain(m: str) -> tuple[str, ...]:
        return (m, *max((chain(d) for d in edges[m]), key=len, default=()))

    return list(max((chain(m) for m in edges), key=len))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    edges = graph(Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "captioner")
    width = max(map(len, edges))
    for m, deps in sorted(edges.items()):
        print(f"{m:<{width}}  {' '.join(sorted(deps)) or '-'}")
    print(f"\n{len(edges)} modules, {sum(map(len, edges.values()))} imports; "
          f"longest chain: {' -> '.join(longest_chain(edges))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
