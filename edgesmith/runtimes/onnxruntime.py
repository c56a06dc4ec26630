"""ONNX Runtime: loads an OnnxModel on an execution provider and proves which one it runs on.

onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing; here that is an
error: a session asked for CUDA that got the CPU provider is refused, so no profile claims CUDA
when it ran on the CPU.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime, Session, register_runtime

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


class OrtSession(Session):
    runtime = "onnxruntime"

    def __init__(self, model: OnnxModel, *, provider: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None, enable_profiling: bool = False,
                 graph_optimization: str = "all"):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise BadInput(f"unknown execution provider '{provider}'; use one of: {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise BadInput(f"ONNX Runtime here has no {wanted} (installed: {', '.join(ort.get_available_providers())}); "
                           "install onnxruntime-gpu (edgesmith[gpu]) for cuda/tensorrt")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if graph_optimization not in levels:
            raise BadInput(f"graph_optimization must be one of {', '.join(levels)}")
        so.graph_optimization_level = levels[graph_optimization]
        so.enable_profiling = enable_profiling
        so.log_severity_level = 3
        chain = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
        if provider_options:
            providers_arg = [(wanted, dict(provider_options))] + chain[1:]
        else:
            providers_arg = chain
        try:
            self.session = ort.InferenceSession(str(model.path), sess_options=so, providers=providers_arg)
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            raise BadInput(f"{model.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        self.providers = list(self.session.get_providers())
        if self.providers[0] != wanted:
            raise BadInput(f"ONNX Runtime fell back to {self.providers[0]} although {wanted} was asked for "
                           "(CUDA/TensorRT libraries not loadable); fix the GPU install or use --provider cpu")
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.model = model
        self.options = {"provider": provider, "threads": threads, "graph_optimization": graph_optimization,
                        "provider_options": provider_options or {}}
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise BadInput(f"the ONNX model needs input(s) {', '.join(missing)}")
        outs = self.session.run(self._outputs, {n: feeds[n] for n in self._inputs})
        return dict(zip(self._outputs, outs))

    def end_profiling(self) -> str:
        return self.session.end_profiling()

    def close(self) -> None:
        self.session = None


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    kinds = ("onnx",)

    def availability(self) -> Availability:
        dists = installed_distributions()
        if len(dists) > 1:
            return Availability(False, "both onnxruntime and onnxruntime-gpu are installed; they install the same "
                                       "module: pip uninstall -y onnxruntime onnxruntime-gpu, then install one")
        try:
            import onnxruntime as ort
        except ImportError:
            return Availability(False, "onnxruntime is not installed: pip install 'edgesmith[cpu]' (or [gpu])")
        devices = [p.removesuffix("ExecutionProvider").lower() for p in ort.get_available_providers()]
        return Availability(True, "", ort.__version__, devices)

    def load(self, artifact: Artifact, **options: Any) -> OrtSession:
        self.check(artifact)
        options = {k: v for k, v in options.items() if v is not None}
        known = {"provider", "threads", "provider_options", "enable_profiling", "graph_optimization"}
        unknown = set(options) - known
        if unknown:
            raise BadInput(f"onnxruntime: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return OrtSession(artifact, **options)  # type: ignore[arg-type]
