"""The runtime contract: is it usable here, load an artifact into a session, run that session.

A session reports the execution provider it really runs on (``providers``), read back from the
runtime after loading, never copied from what was asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
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
    """A loaded model, ready to run on numpy feeds (int64 token ids, masks).

    What a session can do beyond ``run`` is declared here, with the answer for a session that
    cannot (a class attribute or a method to override), so callers never probe with ``getattr``."""

    runtime: str = ""
    device: str = "cpu"
    #: the providers / backends the session really runs on, in priority order
    providers: list[str]
    #: the options the session runs with, read back from the runtime
    options: dict[str, Any]
    #: whether :meth:`time_run` times one run on the GPU (CUDA events or IOBinding, inputs on the device)
    times_on_device: ClassVar[bool] = False
    #: an early-exit session's exit policy (None for every other session)
    policy: Any = None

    @property
    @abstractmethod
    def input_names(self) -> list[str]: ...

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; return every output by name as a numpy array."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""

    def time_run(self, feeds: dict[str, np.ndarray]) -> float:
        """One run timed on the device, in ms (sessions with :attr:`times_on_device`)."""
        raise BadInput(f"{type(self).__name__} has no device timer; time session.run")

    def device_memory_mb(self) -> float | None:
        """Peak device memory the session accounts for (MiB); None off the GPU or where it keeps no account."""
        return None

    def reset_stats(self) -> None:
        """Forget what the session counted so far (an early-exit session's exits): the timed runs only."""

    def exit_stats(self) -> dict[str, Any] | None:
        """What an early-exit session counted (exits, segment times); None for every other session."""
        return None

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
    #: artifact kinds this runtime runs as decoders (with :attr:`decoder_session`)
    decoder_kinds: ClassVar[tuple[str, ...]] = ()
    #: how to get an artifact this runtime generates with, for the line that refuses another one
    decoder_hint: ClassVar[str] = ""
    #: whether ``edgesmith profile --target`` measures this runtime's decoders on a device over ssh
    remote_generation: ClassVar[bool] = False
    #: the load option that names the device or execution provider (``--provider``'s value goes there)
    device_option: ClassVar[str] = "provider"
    #: a short name for profile labels (``ort``); empty: the name
    short_name: ClassVar[str] = ""
    #: whether a device profile builds the artifact on the device from its ONNX source (trtexec)
    builds_on_device: ClassVar[bool] = False

    @abstractmethod
    def availability(self) -> Availability: ...

    def accepts(self, artifact: Artifact) -> bool:
        return artifact.kind in self.kinds

    @abstractmethod
    def load(self, artifact: Artifact, **options: Any) -> Session: ...

    def load_artifact(self, source: str | Path) -> Artifact:
        """The artifact this runtime runs from ``source`` (what :func:`edgesmith.load` takes)."""
        from edgesmith.artifacts import load

        return load(source)

    # -- decoders (generation) -------------------------------------------------------------------

    #: the decoder session class (a :class:`edgesmith.runtimes.decoder.DecoderSession`), None without one
    decoder_session: ClassVar[type[Any] | None] = None

    def decoder_options(self) -> tuple[str, ...]:
        """The options this runtime's decoder sessions take besides ``threads`` (the class's ``OPTIONS``)."""
        return () if self.decoder_session is None else tuple(self.decoder_session.OPTIONS)

    def check_decoder(self, artifact: Artifact) -> None:
        """One line (BadInput) unless this runtime can run ``artifact`` as a decoder."""
        if self.decoder_session is None:
            raise BadInput(f"runtime '{self.name}' has no generation loop; profile a decoder on "
                           f"{', '.join(decoder_runtime_names())}")
        if artifact.kind in self.decoder_kinds:
            return
        own = default_runtime_for(artifact)
        if own == self.name or artifact.kind not in get_runtime(own).decoder_kinds:
            raise BadInput(f"{artifact.name}: a {artifact.kind} decoder cannot be profiled for generation; "
                           "profile its ONNX export or the torch model")
        hint = f"use --runtime {own}" + (f", or {self.decoder_hint}" if self.decoder_hint else "")
        raise BadInput(f"runtime '{self.name}' cannot run {artifact.name}: a {artifact.kind} model, which runs on "
                       f"{own}, not {self.name}; {hint}")

    def check_decoder_options(self, options: dict[str, Any]) -> None:
        """One line naming an option this runtime's decoder sessions do not declare."""
        allowed = self.decoder_options()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise BadInput(f"{self.name} decoder sessions take no option(s) {', '.join(unknown)} "
                           f"(they take: {', '.join(allowed) or 'none'})")

    def load_decoder(self, artifact: Artifact, *, threads: int | None = None, **options: Any) -> Session:
        """A decoder session (:class:`edgesmith.runtimes.decoder.DecoderSession`) for ``artifact``;
        an option the session does not declare is one line."""
        self.check_decoder(artifact)
        self.check_decoder_options(options)
        assert self.decoder_session is not None  # check_decoder refused a runtime without one
        return self.decoder_session(artifact, threads=threads, **options)

    def decoder_location(self, artifact: Artifact) -> Path | None:
        """The file this runtime loads a decoder from as it is (a GGUF for llama.cpp), or None: the
        artifact's own folder."""
        return None

    def load_decoder_at(self, path: Path, *, threads: int | None = None, **options: Any) -> Session:
        """The decoder session for what a profiling worker was given: the artifact folder, or what
        :meth:`decoder_location` named."""
        return self.load_decoder(self.load_artifact(path), threads=threads, **options)

    def generation_options(self, artifact: Artifact, prompt_tokens: list[int], new_tokens: int,
                           options: dict[str, Any]) -> dict[str, Any]:
        """The session options a generation profile of ``prompt_tokens`` + ``new_tokens`` runs with."""
        return dict(options)

    def per_op(self, artifact: Artifact, options: dict[str, Any], feeds: list[dict[str, np.ndarray]],
               runs: int) -> list[dict[str, Any]]:
        """Per-op (per-layer) mean times from the runtime's own profiler (:data:`PER_OP_PROFILERS`),
        recorded in a session of their own so the profiler never slows a timed loop."""
        target = PER_OP_PROFILERS.get(self.name)
        if target is None:
            raise BadInput(f"per-op times come from ONNX Runtime's or TensorRT's profiler; runtime '{self.name}' "
                           "has none")
        return _resolve(target)(artifact, options, feeds, runs)

    def check(self, artifact: Artifact) -> None:
        if not self.accepts(artifact):
            raise BadInput(
                f"runtime '{self.name}' cannot run a {artifact.kind} model; it runs {', '.join(self.kinds)} models"
                + ("; export it first (edgesmith export MODEL --to onnx)" if artifact.kind == "torch" else "")
            )
        avail = self.availability()
        if not avail.usable:
            raise BadInput(f"runtime '{self.name}' is not usable here: {avail.reason}")


#: the built-in runtimes, by name: "module:Class", imported only when that runtime is asked for
BUILTIN_RUNTIMES: dict[str, str] = {
    "torch": "edgesmith.runtimes.torch:TorchRuntime",
    "onnxruntime": "edgesmith.runtimes.onnxruntime:OnnxRuntime",
    "tensorrt": "edgesmith.tensorrt.runtime:TensorRTRuntime",
    "llamacpp": "edgesmith.runtimes.llamacpp:LlamaCppRuntime",
    "ortgenai": "edgesmith.runtimes.ortgenai:OrtGenAIRuntime",
}

#: sessions for artifact kinds a runtime runs through a feature's own controller:
#: (runtime, kind) -> "module:function(artifact, **options) -> Session"
KIND_SESSIONS: dict[tuple[str, str], str] = {
    ("onnxruntime", "early-exit"): "edgesmith.early_exit.runtime:ort_session",
    ("torch", "early-exit"): "edgesmith.early_exit.runtime:torch_session",
}

#: per-op profilers by runtime: name -> "module:function(artifact, options, feeds, runs) -> [op time dicts]"
PER_OP_PROFILERS: dict[str, str] = {
    "onnxruntime": "edgesmith.runtimes.onnxruntime_profiler:ort_per_op",
    "tensorrt": "edgesmith.tensorrt.runtime:tensorrt_per_layer",
}

_RUNTIMES: dict[str, type[Runtime]] = {}


def _resolve(target: str) -> Any:
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    _RUNTIMES[cls.name] = cls
    return cls


def runtime_names() -> list[str]:
    """Every runtime name, without importing any runtime."""
    return sorted(set(BUILTIN_RUNTIMES) | set(_RUNTIMES))


def available_runtimes() -> dict[str, type[Runtime]]:
    """Every runtime by name, each resolved (imports each runtime's module)."""
    return {name: _runtime_class(name) for name in runtime_names()}


def _runtime_class(name: str) -> type[Runtime]:
    if name not in _RUNTIMES:
        _RUNTIMES[name] = _resolve(BUILTIN_RUNTIMES[name])
    return _RUNTIMES[name]


def get_runtime(name: str) -> Runtime:
    if name not in BUILTIN_RUNTIMES and name not in _RUNTIMES:
        raise BadInput(f"unknown runtime '{name}'; use one of: {', '.join(runtime_names())}")
    return _runtime_class(name)()


def kind_session(runtime: str, artifact: Artifact, options: dict[str, Any]) -> Session | None:
    """A session from the feature that owns ``artifact.kind`` on this runtime (early exit's
    controller, for example), or None when the runtime loads the kind itself."""
    target = KIND_SESSIONS.get((runtime, artifact.kind))
    return None if target is None else _resolve(target)(artifact, **options)


def decoder_runtime_names() -> list[str]:
    """The runtimes with a generation loop (imports each runtime's module, not its library)."""
    return [name for name, cls in available_runtimes().items() if cls.decoder_session is not None]


def default_runtime_for(artifact: Artifact) -> str:
    return {"torch": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt",
            "gguf": "llamacpp"}.get(artifact.kind, "onnxruntime")
