"""ONNX -> TensorRT engine: shape profiles, precisions, two build backends, a cache, validation.

- **Shape profiles** are declared per named dimension: ``batch=1:8:32,seq=16:128:256`` (MIN:OPT:MAX,
  or one number for a fixed size); several profiles may be given. :func:`derive_input_shapes`
  maps them onto every graph input through its dimension names (the export pass names them
  ``batch`` and ``sequence``), so each input gets its (min, opt, max) shapes.
- **Precisions**: fp32 (TF32 off unless asked), fp16, bf16, int8 from an explicit Q/DQ graph (the
  quantize pass's static output; there is no implicit calibration here), fp8 from an FP8 Q/DQ
  graph (NVIDIA Model Optimizer's output) on compute capability >= 8.9. TensorRT 10 gets them
  through builder flags (weak typing); TensorRT 11, which removed those flags, through the graph
  itself, converted first where needed (strong typing, :mod:`edgesmith.tensorrt.precision`).
- **Backends**: TensorRT's Python builder API (``python``), or ``trtexec`` where only the tool is
  installed (Jetson), with the same options through :func:`edgesmith.tensorrt.trtexec.trtexec_build_argv`
  (:mod:`edgesmith.tensorrt.backends`).
- **Cache**: engines under ``<cache>/tensorrt/engines/<key>``, key = ONNX hash + build options +
  TensorRT version + GPU (name and compute capability); the timing cache under
  ``<cache>/tensorrt/timing/<key>.cache`` per TensorRT version and GPU, reused by every build.
  ONNX Runtime's TensorRT provider keeps its engines under ``<cache>/tensorrt/ort-ep/<key>``.
- **Validation**: every engine runs beside its ONNX model on probe inputs inside its profiles
  (:func:`edgesmith.validation.validate`); a breach fails the step (exit 3).

The options, precisions and tolerances are :mod:`edgesmith.tensorrt.options`.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgesmith.artifacts import (
    ENGINE_FILE,
    ENGINE_META_KEYS,
    META_FILE,
    ONNX_FILE,
    Artifact,
    OnnxModel,
    TensorRTEngine,
)
from edgesmith.errors import BadInput
from edgesmith.passes import Context, Pass, register
from edgesmith.storage import atomic_dir, write_text_atomic
from edgesmith.tensorrt.backends import (
    build_python,
    build_trtexec,
    build_typing,
    resolve_backend,
    write_bytes_atomic,
)
from edgesmith.tensorrt.cache import engine_dir, engine_key, timing_cache_path
from edgesmith.tensorrt.identity import DeviceIdentity, device_identity
from edgesmith.tensorrt.options import TensorRTConfig, check_precision, tolerances
from edgesmith.tensorrt.precision import (
    GraphConversion,
    Typing,
    conversion_plan,
    convert_graph,
    needs_conversion,
)
from edgesmith.tensorrt.shapes import (
    ShapeTriple,
    check_profiles_fit,
    derive_input_shapes,
    graph_input_dims,
    max_positions,
    parse_profiles,
)

log = logging.getLogger(__name__)

#: probes the engine is validated on: batch sizes and fixed lengths, kept inside its profiles
PROBE_BATCHES = (1, 3)
PROBE_SEQ = 48


def build_identity(cfg: TensorRTConfig, backend: str, typing: Typing = "weak",
                   converter: str | None = None) -> dict[str, Any]:
    """The build options that change the engine (validation tolerances and tool paths do not):
    with them the typing and, for a strongly typed build from a converted graph, the converter."""
    return {"precision": cfg.precision, "profiles": list(cfg.shapes), "workspace_mib": cfg.workspace_mib,
            "optimization_level": cfg.optimization_level, "tf32": cfg.tf32, "backend": backend,
            "typing": typing, "graph_converter": converter}


# ---------------------------------------------------------------------------------------------
# Engine metadata
# ---------------------------------------------------------------------------------------------


def engine_meta(identity: DeviceIdentity, cfg: TensorRTConfig, onnx_hash: str, backend: str,
                shapes: list[dict[str, ShapeTriple]], typing: Typing = "weak",
                conversion: GraphConversion | None = None) -> dict[str, Any]:
    """What ``meta["tensorrt"]`` records about a built engine."""
    if conversion is not None:
        graph = conversion.describe()
    elif typing == "strong":
        graph = "built from the graph's own types (strong typing)"
        if cfg.precision in ("int8", "fp8"):
            graph += "; float layers of the Q/DQ graph run in its float type"
    else:
        graph = "the graph as given, precision from builder flags (weak typing)"
    return {
        **identity.as_dict(),
        "precision": cfg.precision,
        "typing": typing,
        "graph": graph,
        "profiles": [{name: {"min": list(t[0]), "opt": list(t[1]), "max": list(t[2])} for name, t in p.items()}
                     for p in shapes],
        "shape_specs": list(cfg.shapes),
        "source_onnx_hash": onnx_hash,
        "backend": backend,
        "options": build_identity(cfg, backend, typing, conversion.converter if conversion else None),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def profile_accepts(meta: dict[str, Any]):
    """A probe filter: True when (batch, seq) lie inside one of the engine's profiles."""
    def accept(desc: dict) -> bool:
        for profile in meta["profiles"]:
            if all(all(lo <= v <= hi for v, lo, hi in zip((desc["batch"], desc["seq"]), r["min"], r["max"]))
                   for r in profile.values()):
                return True
        return False

    return accept


# ---------------------------------------------------------------------------------------------
# Building (cached) and the pass
# ---------------------------------------------------------------------------------------------


def build_engine(model: OnnxModel, cfg: TensorRTConfig, *, cache_root: str | Path | None = None) -> Path:
    """The cached engine folder for ``model`` under ``cfg`` on this GPU: built (atomically) when
    missing, reused when present. Holds ``model.engine`` and ``engine.json`` (the metadata)."""
    backend = resolve_backend(cfg.backend, cfg.trtexec)
    identity = device_identity()
    if identity.gpu_name is None:
        raise BadInput("building a TensorRT engine needs a CUDA GPU (engines are built on the GPU they run on); "
                       "none is visible here")
    if identity.tensorrt_version is None:
        raise BadInput("cannot tell which TensorRT is installed (no tensorrt bindings, no libnvinfer)")
    profiles = parse_profiles(cfg.shapes)
    check_profiles_fit(profiles, max_positions(model.folder))
    check_precision(cfg.precision, model.path, identity.compute_capability)
    dims = graph_input_dims(model.path)
    shapes = [derive_input_shapes(dims, p) for p in profiles]
    typing = build_typing(backend, identity.tensorrt_version)
    convert = needs_conversion(cfg.precision, typing, model.path)
    if typing == "strong" and cfg.precision in ("int8", "fp8"):
        log.warning("TensorRT %s is strongly typed: the float layers of this Q/DQ graph run in its own float type "
                    "(TensorRT 10 could run them in fp16)", identity.tensorrt_version)
    converter = conversion_plan(cfg.precision) if convert else None
    onnx_hash = model.content_hash()
    key = engine_key(onnx_hash, build_identity(cfg, backend, typing, converter), identity)
    folder = engine_dir(key, cache_root)
    if (folder / ENGINE_FILE).exists() or (folder / "engine.json").exists():
        damage = cached_engine_damage(folder)
        if damage is None:
            log.info("TensorRT engine reused from the cache (%s)", key[:12])
            return folder
        log.warning("the cached TensorRT engine %s is damaged (%s); building it again", folder, damage)
    timing = timing_cache_path(identity, cache_root) if cfg.timing_cache else None
    with tempfile.TemporaryDirectory(prefix="edgesmith-trt-graph-") as scratch, atomic_dir(folder) as tmp:
        conversion = convert_graph(model.path, cfg.precision, scratch, converter) if convert else None
        source = conversion.path if conversion else model.path
        if backend == "python":
            write_bytes_atomic(tmp / ENGINE_FILE, build_python(source, shapes, cfg, timing))
        else:
            build_trtexec(source, tmp / ENGINE_FILE, list(dims), shapes, cfg, timing, typing)
        meta = engine_meta(identity, cfg, onnx_hash, backend, shapes, typing, conversion)
        write_text_atomic(tmp / "engine.json", json.dumps(meta, indent=2) + "\n")
    return folder


def cached_engine_damage(folder: Path) -> str | None:
    """None when ``folder`` holds a whole cached engine (``model.engine`` and an ``engine.json`` record
    naming what it was built for), else what is wrong with it, in a few words."""
    record = folder / "engine.json"
    if not (folder / ENGINE_FILE).is_file() or (folder / ENGINE_FILE).stat().st_size == 0:
        return f"{folder / ENGINE_FILE} is missing or empty"
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{record}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else 'not valid JSON'}"
    missing = [k for k in ENGINE_META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        return f"{record} lacks {', '.join(missing)}"
    if not isinstance(meta["profiles"], list) or not isinstance(meta["precision"], str):
        return f"{record}: 'profiles' must be a list and 'precision' a name"
    return None


def engine_artifact(model: OnnxModel, cached: Path, folder: Path) -> TensorRTEngine:
    """A TensorRTEngine in ``folder``: the cached engine plus the ONNX folder's tokenizer and config."""
    for f in model.folder.iterdir():
        if f.is_file() and f.name != META_FILE and f.name != ONNX_FILE and f.suffix not in (".onnx", ".data"):
            shutil.copy2(f, folder / f.name)
    shutil.copy2(cached / ENGINE_FILE, folder / ENGINE_FILE)
    meta = {**copy.deepcopy(model.meta), "tensorrt": json.loads((cached / "engine.json").read_text())}
    meta["precision"] = meta["tensorrt"]["precision"]
    return TensorRTEngine(task=model.task, name=model.name, lineage=copy.deepcopy(model.lineage), meta=meta,
                          folder=folder, inputs=list(model.input_names), outputs=list(model.output_names))


def probe_shapes(meta: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Probe batch sizes and fixed lengths inside the first profile's ranges."""
    first = next(iter(meta["profiles"][0].values()))
    (b_lo, s_lo), (b_hi, s_hi) = first["min"][:2], first["max"][:2]
    batches = sorted({min(max(b, b_lo), b_hi) for b in PROBE_BATCHES})
    return batches, [min(max(PROBE_SEQ, s_lo), s_hi)]


@register
class TensorRTPass(Pass):
    """OnnxModel -> TensorRTEngine on this GPU, validated against the ONNX model on probe inputs."""

    name = "tensorrt"
    config_class = TensorRTConfig
    accepts = (OnnxModel,)
    returns = TensorRTEngine
    description = "build a TensorRT engine (fp32/fp16/bf16, int8/fp8 from Q/DQ) and validate it against the ONNX model"

    @classmethod
    def environment_key(cls) -> dict[str, Any]:
        # an engine is specific to the TensorRT release and the GPU: a cached step from another
        # machine must never be reused here
        from edgesmith.tensorrt.runtime import device_identity

        try:
            return device_identity().as_dict()
        except Exception as exc:  # no CUDA / no TensorRT: the build itself will refuse with the reason
            return {"device": f"unavailable: {type(exc).__name__}"}

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        from edgesmith.validation import PROBE_POOL, validate

        assert isinstance(artifact, OnnxModel)
        cfg: TensorRTConfig = self.config  # type: ignore[assignment]
        cached = build_engine(artifact, cfg)
        folder = ctx.scratch("tensorrt")
        engine = engine_artifact(artifact, cached, folder)
        atol, min_cosine = tolerances(cfg)
        batches, seq_lengths = probe_shapes(engine.engine_meta)
        result = validate(artifact, engine, atol, min_cosine, label=f"TensorRT {cfg.precision} build",
                          texts=ctx.corpus(PROBE_POOL), batches=batches, seq_lengths=seq_lengths,
                          tokenizer=artifact.tokenizer, accept=profile_accepts(engine.engine_meta))
        ctx.report.update(result)
        ctx.report.update({"size_bytes": engine.size_bytes(), "gpu": engine.engine_meta["gpu_name"],
                           "tensorrt_version": engine.engine_meta["tensorrt_version"],
                           "backend": engine.engine_meta["backend"]})
        log.info("TensorRT %s engine for %s: max abs diff %.2e, min cosine %.6f", cfg.precision, artifact.name,
                 result["max_abs"], result["min_cosine"])
        return engine


def to_tensorrt(model: OnnxModel, ctx: Context | None = None, **options: Any) -> Artifact:
    """Build and validate a TensorRT engine from an ONNX model (see :class:`TensorRTConfig`)."""
    return TensorRTPass(**options)(model, ctx)
