"""The runtime contract: is it usable here, load an artifact into a session, run that session.

A session reports the execution provider it really runs on (``providers``), read back from the
runtime after loading, never copied from what was asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput


@dataclass
class Availability:
    usable: bool
    reason: str = ""
    version: str | None = None
    devices: list[str] = field(default_factory=list)


class Session(ABC):
    """A loaded model, ready to run on numpy feeds (int64 token ids, masks)."""

    runtime: str = ""
    device: str = "cpu"
    #: the providers / backends the session really runs on, in priority order
    providers: list[str]
    options: dict[str, Any]

    @property
    @abstractmethod
    def input_names(self) -> list[str]: ...

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; return every output by name as a numpy array."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""

    def close(self) -> None:
        """Release what the session holds."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Runtime(ABC):
    name: ClassVar[str]
    #: artifact kinds this runtime can load
    kinds: ClassVar[tuple[str, ...]]

    @abstractmethod
    def availability(self) -> Availability: ...

    def accepts(self, artifact: Artifact) -> bool:
        return artifact.kind in self.kinds

    @abstractmethod
    def load(self, artifact: Artifact, **options: Any) -> Session: ...

    def check(self, artifact: Artifact) -> None:
        if not self.accepts(artifact):
            raise BadInput(
                f"runtime '{self.name}' cannot run a {artifact.kind} model; it runs {', '.join(self.kinds)} models"
                + ("; export it first (edgesmith export MODEL --to onnx)" if artifact.kind == "torch" else "")
            )
        avail = self.availability()
        if not avail.usable:
            raise BadInput(f"runtime '{self.name}' is not usable here: {avail.reason}")


_RUNTIMES: dict[str, type[Runtime]] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    _RUNTIMES[cls.name] = cls
    return cls


def available_runtimes() -> dict[str, type[Runtime]]:
    import edgesmith.runtimes.onnxruntime  # noqa: F401
    import edgesmith.runtimes.tensorrt  # noqa: F401
    import edgesmith.runtimes.torch  # noqa: F401

    return dict(_RUNTIMES)


def get_runtime(name: str) -> Runtime:
    runtimes = available_runtimes()
    if name not in runtimes:
        raise BadInput(f"unknown runtime '{name}'; use one of: {', '.join(runtimes)}")
    return runtimes[name]()


def default_runtime_for(artifact: Artifact) -> str:
    return {"torch": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}.get(artifact.kind, "onnxruntime")
