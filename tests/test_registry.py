"""The pass and runtime registries are tables of names resolved on lookup: every built-in is listed
and resolves, every Pass or Runtime class in the package is listed, and asking for one imports only it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.passes import BUILTIN_PASSES, Pass, get_pass, pass_names
from edgesmith.runtimes.base import BUILTIN_RUNTIMES, KIND_SESSIONS, Runtime, get_runtime, runtime_names

PACKAGE = Path(__file__).resolve().parent.parent / "edgesmith"


def _classes_deriving(base_names: set[str]) -> dict[str, str]:
    """Classes in the package whose bases name one of ``base_names`` and that set ``name``:
    "module:Class" -> the name they register under."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if not bases & base_names:
                continue
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "name" for t in stmt.targets)
                        and isinstance(stmt.value, ast.Constant)):
                    found[f"{module}:{node.name}"] = stmt.value.value
    return found


@pytest.mark.parametrize("name", sorted(BUILTIN_PASSES), ids=lambda n: f"pass-{n}")
def test_every_builtin_pass_resolves_to_its_name(name):
    cls = get_pass(name)
    assert issubclass(cls, Pass) and cls.name == name


def test_every_pass_class_in_the_package_is_listed():
    classes = _classes_deriving({"Pass"})
    assert classes, "no Pass subclass found: the walk is broken"
    assert {target: name for target, name in classes.items()} == {t: n for n, t in BUILTIN_PASSES.items()}
    assert set(BUILTIN_PASSES) <= set(pass_names())


@pytest.mark.parametrize("name", sorted(BUILTIN_RUNTIMES), ids=lambda n: f"runtime-{n}")
def test_every_builtin_runtime_resolves(name):
    runtime = get_runtime(name)
    assert isinstance(runtime, Runtime) and runtime.name == name


def test_every_runtime_class_in_the_package_is_listed_and_kind_sessions_resolve():
    classes = _classes_deriving({"Runtime"})
    assert {t: n for t, n in classes.items()} == {t: n for n, t in BUILTIN_RUNTIMES.items()}
    assert set(runtime_names()) == set(BUILTIN_RUNTIMES)
    import importlib

    for (runtime, kind), target in KIND_SESSIONS.items():
        module, _, attr = target.partition(":")
        assert runtime in BUILTIN_RUNTIMES and callable(getattr(importlib.import_module(module), attr)), (runtime, kind)


def test_asking_for_one_pass_imports_only_its_family():
    code = ("import sys, edgesmith.passes as p; p.get_pass('prune'); "
            "print(sorted(m for m in sys.modules if m.startswith(('edgesmith.tensorrt', 'edgesmith.export.', "
            "'edgesmith.early_exit', 'edgesmith.compress.quantization', 'edgesmith.compress.distillation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_unknown_pass_and_runtime_are_one_line_bad_input():
    from edgesmith.errors import BadInput

    with pytest.raises(BadInput, match="unknown pass 'prnue'; available passes: .*prune"):
        get_pass("prnue")
    with pytest.raises(BadInput, match="unknown runtime 'onnx'; use one of: .*onnxruntime"):
        get_runtime("onnx")
