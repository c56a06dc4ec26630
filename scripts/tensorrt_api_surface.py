"""Record the Python API surface of a TensorRT bindings wheel, without a GPU or NVIDIA's libraries.

    pip download tensorrt-cu12-bindings==11.4.0.106 --no-deps -d /tmp/trt     (the bindings wheel is on PyPI;
    python scripts/tensorrt_api_surface.py /tmp/trt/tensorrt_cu12_bindings-*.whl  tests/data/tensorrt-api/

The bindings (``tensorrt_bindings/tensorrt.so``) link against libnvinfer, libnvinfer_plugin and
libnvonnxparser, which only NVIDIA's index serves. They need only a handful of symbols from them
to import, so this script compiles stub libraries exporting those symbols (each returns 0) and
imports the real bindings against the stubs in a subprocess. Nothing can be built or run that
way, but every class, enum value, method and property the bindings define is there to list.
The result, ``<version>.json``, lets the tests check edgesmith's TensorRT code against the API
of each TensorRT release (tests/test_tensorrt_api.py). Needs gcc and nm (binutils).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DUMP = r'''
import inspect, json, sys
import tensorrt_bindings as trt

def first_line(obj):
    """The signature: the docstring's first line, or for an overloaded method (whose first line
    is ``name(*args, **kwargs)``) its overloads' signatures joined by " | "."""
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    if not doc:
        return ""
    if "(*args, **kwargs)" in doc[0]:
        name = doc[0].split("(")[0]
        overloads = [line.strip().split(". ", 1)[1] for line in doc
                     if line.strip()[:1].isdigit() and ". " + name + "(" in line]
        if overloads:
            return " | ".join(overloads)
    return doc[0]

out = {"version": trt.__version__, "module": {}}
for name in sorted(dir(trt)):
    if name.startswith("_"):
        continue
    obj = getattr(trt, name)
    if inspect.isclass(obj):
        entry = {"kind": "enum" if hasattr(obj, "__members__") else "class", "members": {}}
        if hasattr(obj, "__members__"):
            entry["values"] = sorted(obj.__members__)
        entry["bases"] = [b.__name__ for b in obj.__mro__[1:] if b.__module__.startswith("tensorrt")]
        for member in sorted(dir(obj)):
            if member.startswith("__") and member != "__init__":
                continue
            try:
                raw = inspect.getattr_static(obj, member)
            except AttributeError:
                continue
            if isinstance(raw, property):
                entry["members"][member] = {"kind": "property", "settable": raw.fset is not None,
                                            "doc": first_line(raw.fget)}
            elif isinstance(raw, (staticmethod, classmethod)):
                entry["members"][member] = {"kind": "method", "doc": first_line(raw.__func__)}
            elif callable(raw):
                entry["members"][member] = {"kind": "method", "doc": first_line(raw)}
            else:
                entry["members"][member] = {"kind": "attribute", "type": type(raw).__name__}
        out["module"][name] = entry
    elif callable(obj):
        out["module"][name] = {"kind": "function", "doc": first_line(obj)}
    else:
        out["module"][name] = {"kind": "value", "type": type(obj).__name__}
json.dump(out, sys.stdout, indent=1, sort_keys=True)
'''

#: libraries of the C and C++ runtime, the loader and Python, which the stubs must not replace
SYSTEM = re.compile(r"^(Py|_Py|dl|pthread|__|_ITM|_ZN|_Z[^N]|mem|str|std|malloc|free|abort)")


def undefined_symbols(so: Path) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True).stdout
    names = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "U" and "@" not in parts[1] and not SYSTEM.match(parts[1]):
            names.append(parts[1])
    return sorted(set(names))


def needed_libraries(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    return [m for m in re.findall(r"Shared library: \[([^\]]+)\]", out) if "nv" in m]


def main(wheel: str, out_dir: str) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(root / "site")
        so = next((root / "site" / "tensorrt_bindings").glob("tensorrt*.so"))
        symbols = undefined_symbols(so)
        source = root / "stub.c"
        source.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
        stubs = root / "stubs"
        stubs.mkdir()
        for lib in needed_libraries(so):
            subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(stubs / lib), str(source)], check=True)
        env = {**os.environ, "LD_LIBRARY_PATH": str(stubs), "PYTHONPATH": str(root / "site")}
        dumped = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, env=env, check=True)
    surface = json.loads(dumped.stdout)
    surface["source"] = Path(wheel).name
    surface["stubbed_symbols"] = symbols
    target = Path(out_dir) / f"{surface['version']}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")
    return target


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(main(sys.argv[1], sys.argv[2]))
