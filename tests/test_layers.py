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




def test_readme_layout_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = [str(p.relative_to(PACKAGE.parent)) for p in modules().values()
               if f"`{p.relative_to(PACKAGE.parent)}`" not in readme]
    assert not missing, f"README § Layout misses {missing}: run python scripts/layout.py --write"


# ---------------------------------------------------------------------------------------------
# Runtimes are named and probed in one place
# ---------------------------------------------------------------------------------------------
#
# What a session can do is declared on its class (edgesmith.runtimes.base.Session: times_on_device,
# time_run, device_memory_mb, reset_stats, exit_stats, policy; DecoderSession: OPTIONS, MAX_BATCH),
# and which runtime does what is a Runtime attribute (decoder_kinds, device_option, short_name,
# builds_on_device, remote_generation, per_op) or a line of the runtime tables
# (edgesmith/runtimes/base.py: BUILTIN_RUNTIMES, KIND_SESSIONS, PER_OP_PROFILERS). So outside the
# modules that implement runtimes, nothing probes a session with getattr/hasattr, and no code
# branches on a runtime's name.
#
# A runtime's home: edgesmith/runtimes/, and every module the tables name (a feature's own runtime:
# edgesmith.tensorrt.runtime, edgesmith.early_exit.runtime), read from the tables here, so a new
# runtime module is a home by its table line. The CLI may also name runtimes (its help and flags).
#
# A runtime-name literal is a string constant equal to a name in BUILTIN_RUNTIMES that is *used as a
# runtime name*: compared (==, !=, in) with an expression whose name says runtime (``runtime``,
# ``runtime_name``, ``session.runtime``, ``spec["runtime"]``); passed to get_runtime/kind_session or
# as a ``runtime=``/``*_runtime=`` keyword; held by (in a tuple, list, set or dict assigned to) a
# name that says runtime; or returned by a function whose name says runtime. The same words as an
# artifact kind ("torch", "tensorrt"), a package or distribution name ("onnxruntime" in a version
# table), a pass name or a meta key are other things and are not counted.
#
# Exemptions, each checked rather than trusted:
# - ``Literal[...]`` in config schemas (targets' RuntimeName, the GGUF export's ``runtime``):
#   pydantic validates recipes and target files against them, and L1 config cannot import the L2
#   table; every runtime-like member must be a registered runtime, so a renamed runtime fails here.
#   A schema field's default that is such a Literal's member is allowed with it.
# - edgesmith/profiling/agent.py: the stdlib-only device agent, copied alone to devices; its
#   subcommands (``onnxruntime``, ``llamacpp``) are its own protocol and it imports nothing.

AGENT = "edgesmith.profiling.agent"


def _runtime_tables() -> dict[str, dict]:
    """BUILTIN_RUNTIMES, KIND_SESSIONS and PER_OP_PROFILERS, read from runtimes/base.py (no import)."""
    tree = ast.parse((PACKAGE / "runtimes" / "base.py").read_text())
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None \
                and node.target.id in ("BUILTIN_RUNTIMES", "KIND_SESSIONS", "PER_OP_PROFILERS"):
            tables[node.target.id] = ast.literal_eval(node.value)
    return tables


def runtime_names() -> set[str]:
    return set(_runtime_tables()["BUILTIN_RUNTIMES"])


def runtime_homes() -> set[str]:
    """edgesmith.runtimes and every module the runtime tables name."""
    targets = [t for table in _runtime_tables().values() for t in table.values()]
    return {"edgesmith.runtimes"} | {t.split(":")[0] for t in targets}


def _within(module: str, prefixes: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _word(node: ast.AST) -> str:
    """The name an expression goes by: ``x``, ``a.x``, ``a["x"]``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    return ""


def _says_runtime(node: ast.AST) -> bool:
    return "runtime" in _word(node).lower()


def _literals(node: ast.AST, names: set[str]) -> list[ast.Constant]:
    """Runtime-name constants in ``node`` itself or among its tuple/list/set/dict elements."""
    if isinstance(node, ast.Constant) and node.value in names:
        return [node]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _literals(e, names)]
    if isinstance(node, ast.Dict):
        return [c for e in [*node.keys, *node.values] if e is not None for c in _literals(e, names)]
    return []


def _runtime_literals(tree: ast.AST, names: set[str]) -> list[tuple[int, str, str]]:
    """(line, literal, how it is used) for every runtime-name literal used as a runtime name."""
    found: list[tuple[int, str, str]] = []

    def add(nodes: list[ast.Constant], how: str) -> None:
        found.extend((c.lineno, c.value, how) for c in nodes)

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_says_runtime(s) for s in sides):
                add([c for s in sides for c in _literals(s, names)], "compared with a runtime")
        elif isinstance(node, ast.Call):
            if _word(node.func) in ("get_runtime", "kind_session"):
                add([c for a in node.args for c in _literals(a, names)], f"passed to {_word(node.func)}")
            for keyword in node.keywords:
                if keyword.arg and "runtime" in keyword.arg:
                    add(_literals(keyword.value, names), f"passed as {keyword.arg}=")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            schema_default = isinstance(node, ast.AnnAssign) and _word(node.annotation) in LITERAL_ALIASES
            if any(_says_runtime(t) for t in targets) and not schema_default and not _is_literal(node.value):
                add(_literals(node.value, names), "held by a runtime name")
        elif isinstance(node, ast.Return) and node.value is not None and "runtime" in function.lower():
            add(_literals(node.value, names), f"returned by {function}")
        for child in ast.iter_child_nodes(node):
            if not _is_literal(child):
                visit(child, function)

    visit(tree, "")
    return found


def _is_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Subscript) and _word(node.value) == "Literal"


#: type aliases of Literals a schema field may default to one member of
LITERAL_ALIASES = ("RuntimeName",)


def _literal_members(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if _is_literal(node):
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            out += [(e.lineno, e.value) for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return out


def _session_probes(tree: ast.AST) -> list[int]:
    """Lines of ``getattr``/``hasattr`` calls on a session (an expression whose name says session)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
            and node.args and "session" in _word(node.args[0]).lower()]


def test_no_session_capability_is_probed_outside_the_runtimes():
    homes = runtime_homes()
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}" for name, path in modules().items() if not _within(name, homes)
           for line in _session_probes(ast.parse(path.read_text()))]
    assert not bad, ("getattr/hasattr on a session outside the runtimes (declare the capability on "
                     "runtimes.base.Session or the session class instead):\n" + "\n".join(bad))


def test_no_runtime_name_is_written_outside_the_runtimes_and_the_cli():
    names, allowed = runtime_names(), runtime_homes() | {"edgesmith.cli", AGENT}
    bad = []
    for name, path in modules().items():
        if _within(name, allowed):
            continue
        for line, value, how in _runtime_literals(ast.parse(path.read_text()), names):
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} {value!r} {how}")
    assert not bad, ("runtime names written outside edgesmith/runtimes/ and edgesmith/cli/ (ask the Runtime, "
                     "or add a Runtime attribute or table line):\n" + "\n".join(bad))


def test_schema_literals_name_registered_runtimes_only():
    """The exemption for config Literals holds only while their runtime-like members are runtimes."""
    names = runtime_names()
    like = {n for n in names} | {"ort", "onnx-runtime", "llama.cpp", "llama-cpp", "trt"}
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} {value!r}" for path in modules().values()
           for line, value in _literal_members(ast.parse(path.read_text())) if value in like and value not in names]
    assert not bad, "Literal members that look like runtimes but are not registered:\n" + "\n".join(bad)


def test_the_runtime_rules_catch_what_they_describe():
    names = {"torch", "onnxruntime", "llamacpp"}
    code = ast.parse(
        "def f(session, art, runtime):\n"
        "    if runtime == 'llamacpp': pass\n"                      # 2: compared
        "    get_runtime('onnxruntime')\n"                          # 3: passed to get_runtime
        "    open_decoder(art, runtime='torch')\n"                  # 4: keyword
        "    RUNTIME_SHORT = {'onnxruntime': 'ort'}\n"              # 5: held by a runtime name
        "    getattr(session, 'time_run', None)\n"                  # 6: probing
        "    if art.kind == 'torch': pass\n"                        # an artifact kind: not a runtime name
        "    KEY_PACKAGES = ('torch', 'onnxruntime')\n"             # packages: not runtime names
        "    x: Literal['onnxruntime', 'tensorrt'] = 'x'\n"         # a schema Literal: exempt
        "def default_runtime(a):\n"
        "    return 'torch'\n")                                     # 11: returned by a runtime function
    assert sorted(line for line, _, _ in _runtime_literals(code, names)) == [2, 3, 4, 5, 11]
    assert _session_probes(code) == [6]


if __name__ == "__main__":
    for importer, line, imported, _ in sorted(edges()):
        print(f"L{layer_of(importer)} {importer}:{line} -> L{layer_of(imported)} {imported}")
