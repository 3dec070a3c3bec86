"""No function in captioner/ is longer than 60 lines: a longer one is split where its steps part."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "captioner"
LIMIT = 60


def long_functions() -> dict[str, int]:
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    found[f"{path.stem}.{node.name}"] = lines
    return found


def test_no_function_in_the_package_is_over_60_lines():
    assert not long_functions(), f"functions over {LIMIT} lines: {long_functions()}"
