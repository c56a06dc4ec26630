"""ONNX Runtime's session options and execution providers, shared by the encoder and decoder sessions.

The encoders' session is :mod:`edgesmith.runtimes.onnxruntime`, the decoders'
:mod:`edgesmith.runtimes.onnxruntime_decoder`.

Layer L2 (a runtime helper): imports errors only.
"""

from __future__ import annotations

from importlib import metadata

from edgesmith.errors import BadInput, first_line

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def installed_distributions() -> list[str]:
    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


#: graph optimization levels by name (ORT's GraphOptimizationLevel)
GRAPH_OPTIMIZATION = ("none", "basic", "extended", "all")


def session_options(*, threads: int | None = None, graph_optimization: str = "all", spinning: str = "default",
                    enable_profiling: bool = False, profile_prefix: str | None = None):
    """ONNX Runtime ``SessionOptions`` as edgesmith's sessions use them: intra-op threads (one
    inter-op thread), a graph optimization level by name, quiet logs, and how idle intra-op threads
    wait: ``"default"`` (ORT's spin-waiting), ``"stop"`` (spin while the session runs, stop when it
    returns: ``session.force_spinning_stop``) or ``"off"`` (``session.intra_op.allow_spinning=0``).
    Two sessions timed in one process starve each other while the idle one spins."""
    import onnxruntime as ort

    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if graph_optimization not in levels:
        raise BadInput(f"graph_optimization must be one of {', '.join(levels)}")
    if spinning not in ("default", "stop", "off"):
        raise BadInput(f"spinning must be default, stop or off (got {spinning!r})")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[graph_optimization]
    so.enable_profiling = enable_profiling
    if profile_prefix:
        so.profile_file_prefix = profile_prefix
    so.log_severity_level = 3
    if spinning == "stop":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    elif spinning == "off":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def wanted_provider(provider: str) -> str:
    """ONNX Runtime's name for ``provider`` (cpu, cuda, tensorrt); one line when it is unknown or
    this ONNX Runtime does not have it."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise BadInput(f"unknown execution provider '{provider}'; use one of: {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise BadInput(f"ONNX Runtime here has no {wanted} (installed: {', '.join(ort.get_available_providers())}); "
                       "install onnxruntime-gpu (edgesmith[gpu]) for cuda/tensorrt")
    return wanted


def open_session(path, so, providers: list, wanted: str):
    """``InferenceSession`` on ``path``, proved to run on ``wanted`` (onnxruntime-gpu silently falls
    back to the CPU when CUDA libraries are missing): one line when it cannot load or fell back."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for a bad graph
        raise BadInput(f"{path}: ONNX Runtime cannot load it ({first_line(exc)[:300]})") from exc
    used = session.get_providers()[0]
    if used != wanted:
        raise BadInput(f"ONNX Runtime fell back to {used} although {wanted} was asked for "
                       "(CUDA/TensorRT libraries not loadable); fix the GPU install or use --provider cpu")
    return session
