"""The shape of the code: functions that fit a screen, unless a comment at their top says why not."""

import ast
from pathlib import Path

import prefalign

SRC = Path(prefalign.__file__).parent
LIMIT = 62  # ~60 lines, a screen


def test_functions_fit_a_screen():
    long = []
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= LIMIT:
                head = "\n".join(lines[node.lineno:node.lineno + 6])
                if "one function on purpose" not in head:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not long, long
