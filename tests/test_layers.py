"""The package's layers are one-way: every edgesmith import, at the top of a module or inside a
function, points to its own layer or below, with no cycle inside a layer.

The table below is the architecture (README § Layout says the same in words). A module's layer is
that of the longest prefix listed; a module that matches none fails the test, so a new module must
be placed on purpose. Run alone: ``.venv/bin/python -m pytest -q tests/test_layers.py``; print the
graph with ``.venv/bin/python tests/test_layers.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgesmith"

#: bottom up; a prefix names a module or a package (then everything under it)
LAYERS: dict[str, int] = {
    # L0 foundations: errors, files, cache, data, schema helpers, statistics
    "edgesmith.errors": 0, "edgesmith.faults": 0, "edgesmith.storage": 0, "edgesmith.cache": 0, "edgesmith.data": 0,
    "edgesmith.inputs": 0, "edgesmith.version": 0, "edgesmith.pooling": 0, "edgesmith.schema": 0, "edgesmith.stats": 0, "edgesmith.corpus": 0,
    "edgesmith.profiling.agent": 0,  # stdlib-only device agent: imports nothing of edgesmith
    # L1 artifacts and model facts
    "edgesmith.artifacts": 1, "edgesmith.structure": 1, "edgesmith.architectures": 1,
    "edgesmith.onnx_graph": 1, "edgesmith.targets": 1, "edgesmith.gguf": 1,
    "edgesmith.tensorrt.precision": 1, "edgesmith.tensorrt.identity": 1, "edgesmith.tensorrt.trtexec": 1,
    "edgesmith.tensorrt.shapes": 1, "edgesmith.tensorrt.cache": 1, "edgesmith.tensorrt.ep": 1,
    "edgesmith.early_exit.network": 1, "edgesmith.early_exit.policy": 1,
    # L2 contracts and engines: the pass contract and registry, runtimes, the training loop
    "edgesmith.passes": 2, "edgesmith.runtimes": 2, "edgesmith.training": 2,
    "edgesmith.tensorrt.runtime": 2, "edgesmith.early_exit.runtime": 2,
    # L3 measuring and reporting
    "edgesmith.quality": 3, "edgesmith.lm_quality": 3, "edgesmith.validation": 3,
    "edgesmith.inspection": 3, "edgesmith.profiling": 3, "edgesmith.reports": 3, "edgesmith.tasks": 3,
    # L4 the passes
    "edgesmith.compress": 4, "edgesmith.export": 4, "edgesmith.tensorrt": 4, "edgesmith.early_exit": 4,
    # L5 orchestration, L6 sweeps, L7 the CLI and the package root
    "edgesmith.recipe": 5, "edgesmith.pipeline": 5,
    "edgesmith.sweep": 6,
    "edgesmith.cli": 7,
}
#: modules placed by their exact name (the package root would otherwise be a prefix of everything)
EXACT: dict[str, int] = {"edgesmith": 7, "edgesmith.__main__": 7}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    if module in EXACT:
        return EXACT[module]
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def imports_of(path: Path, known: set[str]) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every edgesmith import anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "edgesmith" or alias.name.startswith("edgesmith."):
                    found.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "edgesmith" or target.startswith("edgesmith.")):
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            if subs:
                found.extend((node.lineno, s, []) for s in subs)
                rest = [n for n in names if f"{target}.{n}" not in known]
                if rest:
                    found.append((node.lineno, target, rest))
            else:
                found.append((node.lineno, target, names))
    return found


def edges() -> list[tuple[str, int, str, list[str]]]:
    mods = modules()
    known = set(mods)
    out = []
    for name, path in mods.items():
        for line, target, names in imports_of(path, known):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            out.append((name, line, target, names))
    return out


def _cycles(nodes: set[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, f"modules with no layer in tests/test_layers.py LAYERS: {unplaced}"


def test_no_import_points_up():
    mods = modules()
    bad = []
    for importer, line, imported, _ in edges():
        a, b = layer_of(importer), layer_of(imported)
        if imported == importer or a is None or b is None:
            continue
        if b > a:
            rel = mods[importer].relative_to(PACKAGE.parent)
            bad.append(f"{rel}:{line} {importer} (L{a}) → {imported} (L{b})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_cycle_within_a_layer():
    graph: dict[str, set[str]] = {}
    for importer, _, imported, _ in edges():
        if importer != imported and layer_of(importer) == layer_of(imported):
            # a package's __init__ re-exporting its own modules is not a cycle of concepts
            if imported.startswith(importer + ".") and mods_is_package(importer):
                continue
            graph.setdefault(importer, set()).add(imported)
    cycles = _cycles(set(modules()), graph)
    assert not cycles, "import cycles inside a layer: " + "; ".join(" ↔ ".join(c) for c in cycles)


def mods_is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def test_no_private_name_crosses_a_package():
    mods = modules()
    bad = []
    for importer, line, imported, names in edges():
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if not private:
            continue
        home = imported if mods[imported].name == "__init__.py" else imported.rsplit(".", 1)[0]
        if not (importer == home or importer.startswith(home + ".")):
            rel = mods[importer].relative_to(PACKAGE.parent)
            bad.append(f"{rel}:{line} imports {', '.join(private)} from {imported}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The walker sees a function-level import, and a low module importing a high one is refused."""
    fake = tmp_path / "edgesmith"
    (fake / "cli").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "cli" / "app.py").write_text("app = 1\n")
    (fake / "errors.py").write_text("def f():\n    from edgesmith.cli.app import app\n    return app\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = [(i, t) for i, _, t, _ in edges()]
    assert ("edgesmith.errors", "edgesmith.cli.app") in found
    try:
        test_no_import_points_up()
    except AssertionError as exc:
        assert "edgesmith/errors.py:2 edgesmith.errors (L0) → edgesmith.cli.app (L7)" in str(exc)
    else:
        raise AssertionError("an upward import went unnoticed")


if __name__ == "__main__":
    for importer, line, imported, _ in sorted(edges()):
        print(f"L{layer_of(importer)} {importer}:{line} -> L{layer_of(imported)} {imported}")


def test_readme_layout_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = [str(p.relative_to(PACKAGE.parent)) for p in modules().values()
               if f"`{p.relative_to(PACKAGE.parent)}`" not in readme]
    assert not missing, f"README § Layout misses {missing}: run python scripts/layout.py --write"
