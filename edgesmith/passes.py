"""The pass contract and the registry of passes.

A pass has a name, a pydantic config with defaults, the artifact types it accepts and returns,
and ``apply(artifact, ctx) -> artifact``. It never mutates its input. Passes register by name;
third-party passes register through the ``edgesmith.passes`` entry-point group (each entry point
names a :class:`Pass` subclass).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError

from edgesmith.artifacts import Artifact
from edgesmith.errors import BadInput
from edgesmith.faults import point
from edgesmith.schema import StrictModel, describe_validation_error

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgesmith.passes"


class PassConfig(StrictModel):
    """Base of every pass config: unknown keys are refused."""

    #: fields added after step caches were filled: left out of the step's cache key while they
    #: hold their default, so a cache filled before they existed is still hit
    KEY_OMITS_DEFAULT: ClassVar[tuple[str, ...]] = ()

    def key_dump(self) -> dict[str, Any]:
        """The config as the step cache keys it (see :attr:`KEY_OMITS_DEFAULT`)."""
        data = self.model_dump(mode="json")
        fields = type(self).model_fields
        for name in self.KEY_OMITS_DEFAULT:
            if name in data and data[name] == fields[name].get_default(call_default_factory=True):
                del data[name]
        return data


@dataclass
class Context:
    """What a pass may use besides its input: the run's source model, a scratch folder, texts."""

    source: Artifact | None = None
    workdir: Path | None = None
    texts: list[str] | None = None
    labels: list[Any] | None = None
    progress: bool = True
    # what the pass being applied has to say (measurements, choices); reset before each pass
    # and recorded in the output's lineage entry
    report: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def scratch(self, name: str) -> Path:
        """A new empty folder for a pass to build its output in."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="edgesmith-"))
            atexit.register(shutil.rmtree, self.workdir, True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        point(f"scratch:{name}")  # a kill here stops a pass midway (tests/test_faults.py)
        return folder

    def corpus(self, limit: int | None = None) -> list[str]:
        """Texts for calibration or fidelity: the run's data, else the shipped corpus."""
        if self.texts:
            return self.texts[:limit] if limit else list(self.texts)
        from edgesmith.data import builtin_corpus

        return builtin_corpus(limit=limit)


class Pass(ABC):
    """Subclasses set ``name``, ``config_class``, ``accepts``, ``returns`` and define ``apply``."""

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    accepts: ClassVar[tuple[type[Artifact], ...]]
    returns: ClassVar[type[Artifact]]
    description: ClassVar[str] = ""
    #: what a pass reads from its Context besides its input: "data" (ctx.texts/labels) and/or
    #: "source" (ctx.source). The pipeline folds their hashes into the step's cache key.
    uses: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def environment_key(cls) -> dict[str, Any]:
        """What of this machine shapes the pass's output beyond library versions (a GPU, a TensorRT
        release); the pipeline folds it into the step's cache key so nothing stale is reused."""
        return {}

    def __init__(self, config: PassConfig | dict | None = None, **options: Any):
        if isinstance(config, PassConfig):
            if options:
                config = config.model_copy(update=options)
            self.config = config
        else:
            self.config = make_config(self.config_class, {**(config or {}), **options}, where=f"pass '{self.name}'")

    @abstractmethod
    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        """Return a new artifact; never modify ``artifact``."""

    def __call__(self, artifact: Artifact, ctx: Context | None = None) -> Artifact:
        """Check the input type, apply, and append this step to the output's lineage."""
        if not isinstance(artifact, self.accepts):
            raise BadInput(
                f"pass '{self.name}' takes {' or '.join(a.kind for a in self.accepts)} models, "
                f"not {artifact.kind}; put a step that makes one before it"
            )
        ctx = ctx or Context()
        input_hash = artifact.content_hash()
        lineage_before = list(artifact.lineage)
        ctx.report = {}
        started = time.perf_counter()
        out = self.apply(artifact, ctx)
        seconds = time.perf_counter() - started
        if out is artifact:
            raise RuntimeError(f"pass '{self.name}' returned its input; passes must return a new artifact")
        report, ctx.report = ctx.report, {}
        if ORIGIN_KEY in artifact.meta and ORIGIN_KEY not in out.meta:  # where the first artifact came from
            out.meta[ORIGIN_KEY] = artifact.meta[ORIGIN_KEY]
        out.lineage = lineage_before + [{
            "pass": self.name,
            "config": self.config.model_dump(mode="json"),
            "input_hash": input_hash,
            "output_hash": out.content_hash(),
            "seconds": round(seconds, 3),
            "report": report,
        }]
        return out


def make_config(cls: type[PassConfig], values: dict, *, where: str) -> PassConfig:
    """Build a pass config, turning pydantic's errors into one line that names the key."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise BadInput(describe_validation_error(exc, where, cls)) from exc


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

#: the built-in passes, by name: "module:Class", imported only when that pass is asked for
BUILTIN_PASSES: dict[str, str] = {
    "prune": "edgesmith.compress.pruning:PrunePass",
    "distill": "edgesmith.compress.distillation:DistillPass",
    "quantize": "edgesmith.compress.quantization:QuantizePass",
    "quantize-torch": "edgesmith.compress.quantization.torch_int8:TorchQuantizePass",
    "early-exit": "edgesmith.early_exit.passes:EarlyExitPass",
    "quantize-segments": "edgesmith.early_exit.passes:QuantizeSegmentsPass",
    "export": "edgesmith.export.onnx:ExportPass",
    "tensorrt": "edgesmith.tensorrt.build:TensorRTPass",
    "gguf": "edgesmith.export.gguf:GgufPass",
    "gguf-quantize": "edgesmith.compress.quantization.gguf_blocks:GgufQuantizePass",
    "speculate": "edgesmith.compress.speculative:SpeculatePass",
}

#: ``meta`` key every pass carries from its input to its output: where the source model came from
#: (``{"gguf": path}`` for a model read from a GGUF; GGUF export reads the file's tokenizer name there)
ORIGIN_KEY = "origin"

#: passes registered by @register (scripts, plug-ins) and built-ins once imported
_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name to recipes and the CLI."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def resolve(target: str) -> Any:
    """Import ``"package.module:Name"`` and return the name."""
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not break edgesmith
            log.warning("pass plug-in %s could not be loaded: %s", ep.value, exc)
            continue
        if isinstance(cls, type) and issubclass(cls, Pass):
            _REGISTRY.setdefault(ep.name if not getattr(cls, "name", None) else cls.name, cls)
        else:
            log.warning("entry point %s does not name a Pass subclass; ignored", ep.value)


def pass_names() -> list[str]:
    """Every pass name known here, without importing a built-in pass."""
    _load_entry_points()
    return sorted(set(BUILTIN_PASSES) | set(_REGISTRY))


def available_passes() -> dict[str, type[Pass]]:
    """Every pass by name, each resolved (this imports every built-in pass module)."""
    return {name: get_pass(name) for name in pass_names()}


def get_pass(name: str) -> type[Pass]:
    """The pass called ``name``; only its own module is imported."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTIN_PASSES:
        cls = resolve(BUILTIN_PASSES[name])
        _REGISTRY[name] = cls
        return cls
    _load_entry_points()
    if name not in _REGISTRY:
        raise BadInput(f"unknown pass '{name}'; available passes: {', '.join(pass_names())}")
    return _REGISTRY[name]
