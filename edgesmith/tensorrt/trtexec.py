"""trtexec command lines (TensorRT on Jetson and other devices reached over SSH), written against
trtexec's documented flags; the local build and the remote profiler use the same ones."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from edgesmith.errors import BadInput
from edgesmith.tensorrt.precision import Typing, trtexec_precision_flags

# trtexec (TensorRT on Jetson): command lines against trtexec's documented flags
# ---------------------------------------------------------------------------------------------


def _shape_spec(input_names: Sequence[str], batch: int, seq: int) -> str:
    return ",".join(f"{name}:{batch}x{seq}" for name in input_names)


ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def trtexec_build_argv(trtexec: str, onnx_path: str, engine_path: str, *, input_names: Sequence[str],
                       batch: int | None = None, seq: int | None = None, precision: str = "fp16",
                       workspace_mib: int = 1024, timing_cache: str | None = None,
                       profiles: Sequence[dict[str, ShapeTriple]] | None = None,
                       optimization_level: int | None = None, typing: Typing = "weak") -> list[str]:
    """``trtexec`` build of an engine from an ONNX graph (engines are device-specific).

    Shapes: ``profiles`` (one dict per optimization profile: input name -> (min, opt, max) shapes;
    trtexec takes one ``--minShapes/--optShapes/--maxShapes`` triple per profile, in order), or a
    single static ``batch`` x ``seq`` profile for every input. Precision flags: see
    :func:`edgesmith.tensorrt.precision.trtexec_precision_flags` (TensorRT 10's; a strongly typed
    trtexec, TensorRT 11, gets none and the graph must carry the precision; no fp8: FP8 needs
    Hopper-class GPUs, where the Python builder is available, and trtexec builds serve Jetsons). ``--memPoolSize=workspace:N`` is in MiB,
    ``--builderOptimizationLevel`` 0-5, ``--skipInference``: build only.
    """
    precision_flags = trtexec_precision_flags(precision, typing)  # refuses an unknown precision first
    if not profiles:
        if batch is None or seq is None or batch < 1 or seq < 1:
            raise BadInput(f"batch and seq must be at least 1 (got batch={batch}, seq={seq})")
        static = (batch, seq)
        profiles = [{name: (static, static, static) for name in input_names}]
    argv = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    for profile in profiles:
        missing = [n for n in input_names if n not in profile]
        if missing:
            raise BadInput(f"trtexec profile has no shapes for input(s) {', '.join(missing)}")
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            argv.append(f"{flag}=" + ",".join(f"{n}:{_dims(profile[n][i])}" for n in input_names))
    argv += [f"--memPoolSize=workspace:{int(workspace_mib)}", "--skipInference"]
    argv += precision_flags
    if optimization_level is not None:
        if not 0 <= int(optimization_level) <= 5:
            raise BadInput(f"builder optimization level must be 0-5 (got {optimization_level})")
        argv.append(f"--builderOptimizationLevel={int(optimization_level)}")
    if timing_cache:
        argv.append(f"--timingCacheFile={timing_cache}")
    return argv


def trtexec_run_argv(trtexec: str, engine_path: str, *, input_names: Sequence[str], batch: int, seq: int,
                     inputs_dir: str | None, warmup_ms: int, iterations: int, duration_s: float,
                     times_path: str, profile_path: str | None = None) -> list[str]:
    """``trtexec`` timing of a built engine: every iteration's latency to ``--exportTimes``, and
    per-layer times (in a separate run, so profiling never skews the timings) to ``--exportProfile``."""
    argv = [trtexec, f"--loadEngine={engine_path}", f"--shapes={_shape_spec(input_names, batch, seq)}",
            f"--warmUp={int(warmup_ms)}", f"--iterations={int(iterations)}", f"--duration={duration_s:g}",
            f"--exportTimes={times_path}"]
    if inputs_dir:
        argv.append("--loadInputs=" + ",".join(f"{n}:{inputs_dir}/{n}.bin" for n in input_names))
    if profile_path:
        argv += [f"--exportProfile={profile_path}", "--separateProfileRun"]
    return argv


def device_engine_key(artifact_hash: str, precision: str, batch: int, seq: int, device: dict) -> str:
    """An engine is specific to the graph, precision, shapes, GPU and TensorRT version (and L4T)."""
    ident = json.dumps([artifact_hash, precision, batch, seq, (device.get("gpu") or {}).get("name"),
                        device.get("l4t_release"), device.get("libraries", {}).get("tensorrt"),
                        device.get("cpu_model")], sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]

