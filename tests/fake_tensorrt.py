"""A strict stand-in for the ``tensorrt`` module, made from a recorded API surface.

``tests/data/tensorrt-api/<version>.json`` lists what the real TensorRT Python bindings of that
release define (scripts/tensorrt_api_surface.py records it from NVIDIA's PyPI wheel). The fake
module built here has exactly those classes, enum values, methods and properties, and nothing
else: code written for another release fails on it as it would on the real one (AttributeError),
e.g. ``trt.BuilderFlag.FP16`` on TensorRT 11. Methods record their calls and return a default of
the type their signature declares (another fake object for a TensorRT class); tests override
return values per ``"Class.member"``.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any, Callable

SURFACES = Path(__file__).parent / "data" / "tensorrt-api"
_PREFIX = re.compile(r"tensorrt(?:_bindings)?\.tensorrt\.")


def surface_versions() -> list[str]:
    return sorted(p.stem for p in SURFACES.glob("*.json"))


def load_surface(version: str) -> dict[str, Any]:
    return json.loads((SURFACES / f"{version}.json").read_text())


class EnumValue:
    def __init__(self, enum: str, name: str):
        self.enum, self.name = enum, name

    def __repr__(self) -> str:
        return f"{self.enum}.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnumValue) and (other.enum, other.name) == (self.enum, self.name)

    def __hash__(self) -> int:
        return hash((self.enum, self.name))

    def __int__(self) -> int:
        return 0


class FakeObject:
    """Base of every fake TensorRT class."""

    _fake_name = "object"
    _fake_module: "FakeTensorRT"

    def __init__(self, *args: Any, **kwargs: Any):
        object.__setattr__(self, "_values", {})
        self._fake_module.calls.append((self._fake_name, "__init__", args, kwargs))

    def __setattr__(self, name: str, value: Any) -> None:
        if type(self)._fake_name != type(self).__name__ or name.startswith("_"):
            object.__setattr__(self, name, value)  # a user subclass (an IProfiler), or private state
            return
        member = self._fake_module.members(self._fake_name).get(name)
        if member is None:
            raise AttributeError(f"'tensorrt.{self._fake_name}' object has no attribute '{name}'")
        if member["kind"] != "property" or not member.get("settable"):
            raise AttributeError(f"tensorrt.{self._fake_name}.{name} cannot be set")
        self._fake_module.calls.append((self._fake_name, name, (value,), {"set": True}))
        self._values[name] = value

    def __bytes__(self) -> bytes:
        return self._fake_module.result(self._fake_name, "__bytes__", self, (), {}, b"")


def _returns(doc: str) -> str:
    return doc.rsplit("->", 1)[1].strip() if "->" in doc else ""


class FakeTensorRT(types.ModuleType):
    """The fake module: ``calls`` holds (class, member, args, kwargs) in order."""

    def __init__(self, version: str, overrides: dict[str, Any] | None = None):
        super().__init__("tensorrt")
        self.surface = load_surface(version)["module"]
        self.__version__ = load_surface(version)["version"]
        self.calls: list[tuple[str, str, tuple, dict]] = []
        self.overrides = dict(overrides or {})
        self._classes: dict[str, type] = {}

    # -- what exists ------------------------------------------------------------------------
    def members(self, cls: str) -> dict[str, Any]:
        return self.surface[cls].get("members", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name not in self.surface:
            raise AttributeError(f"module 'tensorrt' has no attribute '{name}'")
        if self.surface[name]["kind"] in ("class", "enum"):
            return self._class(name)
        raise AttributeError(f"the fake does not model tensorrt.{name} ({self.surface[name]['kind']})")

    def _class(self, name: str) -> type:
        if name in self._classes:
            return self._classes[name]
        entry = self.surface[name]
        namespace: dict[str, Any] = {"_fake_name": name, "_fake_module": self}
        for value in entry.get("values", []):
            namespace[value] = EnumValue(name, value)
        for member, info in entry.get("members", {}).items():
            if member == "__init__" or member in namespace:
                continue
            if info["kind"] == "method":
                namespace[member] = self._method(name, member, info["doc"])
            elif info["kind"] == "property":
                namespace[member] = self._property(name, member, info)
            else:  # a class attribute: an enum value exported into the class (Logger.WARNING)
                namespace[member] = EnumValue(info.get("type", name), member)
        cls = type(name, (FakeObject,), namespace)
        self._classes[name] = cls
        return cls

    # -- behaviour --------------------------------------------------------------------------
    def default(self, declared: str) -> Any:
        declared = declared.replace("typing.Optional[", "").rstrip("]")
        if declared == "bool":
            return True
        if declared in ("int", "typing.SupportsInt"):
            return 0
        if declared == "float":
            return 0.0
        if declared == "str":
            return ""
        match = _PREFIX.match(declared)
        if match:
            name = declared[match.end():]
            if name in self.surface and self.surface[name]["kind"] == "class":
                return self._class(name)()
            if name in self.surface and self.surface[name]["kind"] == "enum":
                values = self.surface[name].get("values") or ["NONE"]
                return EnumValue(name, values[0])
        return None

    def result(self, cls: str, member: str, obj: Any, args: tuple, kwargs: dict, fallback: Any) -> Any:
        key = f"{cls}.{member}"
        if key not in self.overrides:
            return fallback
        value = self.overrides[key]
        return value(obj, *args, **kwargs) if callable(value) else value

    def _method(self, cls: str, member: str, doc: str) -> Callable:
        module = self

        def method(obj, *args, **kwargs):
            module.calls.append((cls, member, args, kwargs))
            return module.result(cls, member, obj, args, kwargs, module.default(_returns(doc)))

        method.__name__ = member
        return method

    def _property(self, cls: str, member: str, info: dict) -> property:
        module = self

        def get(obj):
            if member in obj._values:
                return obj._values[member]
            return module.result(cls, member, obj, (), {}, module.default(_returns(info["doc"])))

        return property(get)

    def called(self, cls: str, member: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for c, m, args, kwargs in self.calls if (c, m) == (cls, member)]
