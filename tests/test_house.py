"""House rules on size: small modules named for what they hold, short functions.

Every module in ``edgesmith/`` is at most MAX_MODULE_LINES lines, except the stdlib-only device
agent (``edgesmith/profiling/agent.py``), which is copied alone to remote devices and so stays one
file; every function or method is at most MAX_FUNCTION_LINES lines, from its ``def`` line to its
last line (decorators not counted, its docstring counted). A failure lists every offender at once.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgesmith"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
#: modules allowed past MAX_MODULE_LINES, each with its reason
LONG_MODULES = {"edgesmith/profiling/agent.py": "copied alone to devices (stdlib only), so it stays one file"}


def module_sizes(root: Path) -> list[tuple[str, int]]:
    return [(str(p.relative_to(root.parent)), len(p.read_text().splitlines())) for p in sorted(root.rglob("*.py"))]


def long_modules(root: Path) -> list[str]:
    return [f"{path}: {n} lines" for path, n in module_sizes(root) if n > MAX_MODULE_LINES and path not in LONG_MODULES]


def long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_module_is_too_long():
    bad = long_modules(PACKAGE)
    assert not bad, f"modules over {MAX_MODULE_LINES} lines (split them by concept):\n" + "\n".join(bad)


def test_no_function_is_too_long():
    bad = long_functions(PACKAGE)
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(bad)


def test_the_size_checks_catch_offenders(tmp_path):
    """The walkers see a long method inside a class and a long module, and name them all."""
    pkg = tmp_path / "edgesmith"
    (pkg / "profiling").mkdir(parents=True)
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "big.py").write_text("class A:\n    def long(self):\n" + body + "\n" + "y = 1\n" * MAX_MODULE_LINES)
    (pkg / "small.py").write_text("def short():\n    return 1\n")
    (pkg / "profiling" / "agent.py").write_text("z = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_functions(pkg) == [f"edgesmith/big.py:2 long: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_modules(pkg) == [f"edgesmith/big.py: {MAX_MODULE_LINES + 2 + MAX_FUNCTION_LINES} lines"]
