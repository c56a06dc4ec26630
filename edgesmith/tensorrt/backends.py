"""The two ways an engine is built: TensorRT's Python builder API (``python``), or ``trtexec`` where
only the tool is installed (Jetson), with the same options; and which one ``auto`` picks."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from edgesmith.errors import BadInput, EdgesmithError
from edgesmith.tensorrt.identity import import_tensorrt
from edgesmith.tensorrt.options import TensorRTConfig, builder_flags
from edgesmith.tensorrt.precision import Typing, typing_for_version, typing_of_module
from edgesmith.tensorrt.shapes import ShapeTriple
from edgesmith.tensorrt.trtexec import trtexec_build_argv

log = logging.getLogger(__name__)

TRTEXEC_TIMEOUT_S = 3600


def resolve_backend(backend: str, trtexec: str) -> str:
    """``auto``: the Python builder when the bindings import, else trtexec when the tool is on PATH."""
    if backend in ("python", "trtexec"):
        if backend == "python":
            import_tensorrt()
        elif shutil.which(trtexec) is None:
            raise BadInput(f"trtexec not found at '{trtexec}'; install TensorRT or give --trtexec PATH")
        return backend
    try:
        import_tensorrt()
        return "python"
    except BadInput as missing:
        if shutil.which(trtexec) is not None:
            return "trtexec"
        raise BadInput(f"{missing}; nor is trtexec on PATH") from missing


def _set_flags(trt, config, precision: str, tf32: bool, typing: Typing) -> None:
    enable, disable = builder_flags(precision, tf32, typing)
    for name in enable:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in disable:
        config.clear_flag(getattr(trt.BuilderFlag, name))


def build_python(onnx_path: Path, shapes: list[dict[str, ShapeTriple]], cfg: TensorRTConfig,
                 timing_cache: Path | None) -> bytes:
    """Build with TensorRT's Python API: parse, one optimization profile per shape profile, flags,
    workspace, optimization level, timing cache (read before, written back after)."""
    trt = import_tensorrt()
    typing = typing_of_module(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10; 11 is always strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BadInput(f"TensorRT cannot parse {onnx_path}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib * 2**20)
    config.builder_optimization_level = cfg.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names and types for per-layer times
    _set_flags(trt, config, cfg.precision, cfg.tf32, typing)
    for profile_shapes in shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgesmithError(f"TensorRT failed to build an engine from {onnx_path} (its log above says why)")
    if cache is not None and timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_trtexec(onnx_path: Path, engine_path: Path, input_names: list[str],
                  shapes: list[dict[str, ShapeTriple]], cfg: TensorRTConfig, timing_cache: Path | None,
                  typing: Typing = "weak") -> None:
    """Build with ``trtexec`` (same options, through :func:`trtexec_build_argv`)."""

    if cfg.precision == "fp8":
        raise BadInput("fp8 engines need TensorRT's Python builder (backend python); trtexec builds serve "
                       "devices without FP8 (Jetson)")
    argv = trtexec_build_argv(cfg.trtexec, str(onnx_path), str(engine_path), input_names=input_names,
                              precision=cfg.precision, workspace_mib=cfg.workspace_mib,
                              timing_cache=str(timing_cache) if timing_cache else None, profiles=shapes,
                              optimization_level=cfg.optimization_level, typing=typing)
    if not cfg.tf32:
        argv.append("--noTF32")
    log.info("building with trtexec: %s", " ".join(argv))
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=TRTEXEC_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise BadInput(f"trtexec not found at '{cfg.trtexec}'; install TensorRT or give --trtexec PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise EdgesmithError(f"trtexec took longer than {TRTEXEC_TIMEOUT_S} s to build {onnx_path}") from exc
    if out.returncode != 0 or not engine_path.exists():
        tail = [line for line in (out.stdout + out.stderr).splitlines() if "ERROR" in line or "Error" in line]
        raise EdgesmithError(f"trtexec failed to build {onnx_path} (exit {out.returncode}): "
                             f"{'; '.join(tail[-3:]) or 'see trtexec output with --debug'}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_typing(backend: str, version: str | None) -> Typing:
    """The typing of this build: from the bindings themselves (python backend), else from the
    TensorRT version trtexec belongs to."""
    if backend == "python":
        return typing_of_module(import_tensorrt())
    return typing_for_version(version)
