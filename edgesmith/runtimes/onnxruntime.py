"""ONNX Runtime: loads an OnnxModel on an execution provider and proves which one it runs on.

onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing; here that is an
error: a session asked for CUDA that got the CPU provider is refused, so no profile claims CUDA
when it ran on the CPU.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime, Session, register_runtime

log = logging.getLogger(__name__)

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
        provider_options = dict(provider_options or {})
        if provider == "tensorrt":
            provider_options = tensorrt_ep_options(model, provider_options)
        if provider_options:
            providers_arg = [(wanted, provider_options)] + chain[1:]
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
        self._ort = ort
        self._bound: dict[int, Any] = {}
        effective = self.session.get_provider_options().get(wanted, {}) if provider != "cpu" else {}
        self.options = {"provider": provider, "threads": threads, "graph_optimization": graph_optimization,
                        "provider_options": dict(effective) or provider_options}
        if provider != "cpu":
            self.options["timing"] = "wall-clock around run_with_iobinding; inputs and outputs on the device"
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

    def time_run(self, feeds: dict[str, np.ndarray]) -> float:
        """One run on the GPU provider (ms) with inputs and outputs bound on the device (IOBinding),
        so host copies are not timed; ``run_with_iobinding`` returns when the work is done."""
        import time

        if self.device == "cpu":
            raise BadInput("time_run times GPU providers; on the CPU, time session.run")
        binding = self._bound.get(id(feeds))
        if binding is None:
            missing = [n for n in self._inputs if n not in feeds]
            if missing:
                raise BadInput(f"the ONNX model needs input(s) {', '.join(missing)}")
            binding = self.session.io_binding()
            for name in self._inputs:
                value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[name]), "cuda", 0)
                binding.bind_ortvalue_input(name, value)
            for name in self._outputs:
                binding.bind_output(name, "cuda")
            self._bound[id(feeds)] = binding
        binding.synchronize_inputs()
        t0 = time.perf_counter()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return (time.perf_counter() - t0) * 1000.0

    def end_profiling(self) -> str:
        return self.session.end_profiling()

    def close(self) -> None:
        self._bound.clear()
        self.session = None


#: TensorRT provider defaults: engines and timing caches kept (in edgesmith's cache, under a key)
TENSORRT_EP_DEFAULTS = {"trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True"}
#: provider options that work through TensorRT's weak typing (builder flags), gone in TensorRT 11
WEAK_TYPING_EP_OPTIONS = ("trt_fp16_enable", "trt_bf16_enable", "trt_int8_enable")


def tensorrt_ep_options(model: OnnxModel, options: dict[str, Any], cache_root: str | None = None) -> dict[str, Any]:
    """The TensorRT provider's options: the user's, over :data:`TENSORRT_EP_DEFAULTS`, with its
    engine cache placed in edgesmith's cache under a key of the ONNX hash, these options, the
    TensorRT version and the GPU (so a change in any of them gets a fresh folder, and nothing stale
    is reused), and its timing cache per TensorRT version and GPU."""
    from edgesmith.export.tensorrt import (
        ort_engine_cache_dir,
        tensorrt_cache_root,
        timing_cache_key,
    )
    from edgesmith.export.tensorrt_typing import typing_for_version
    from edgesmith.runtimes.tensorrt import device_identity

    merged = {**TENSORRT_EP_DEFAULTS, **{k: v for k, v in options.items()}}
    identity = device_identity()
    weak = [k for k in WEAK_TYPING_EP_OPTIONS if str(merged.get(k, "")).lower() in ("1", "true")]
    if weak and typing_for_version(identity.tensorrt_version) == "strong":
        log.warning("TensorRT %s is strongly typed: %s cannot lower the precision of an fp32 graph; give the "
                    "provider an fp16 graph (edgesmith quantize MODEL --mode fp16) or a Q/DQ graph",
                    identity.tensorrt_version, ", ".join(weak))
    if "trt_engine_cache_path" not in merged:
        folder = ort_engine_cache_dir(model.content_hash(), merged, identity, cache_root)
        folder.mkdir(parents=True, exist_ok=True)
        merged["trt_engine_cache_path"] = str(folder)
    if "trt_timing_cache_path" not in merged:
        timing = tensorrt_cache_root(cache_root) / "ort-ep-timing" / timing_cache_key(identity)
        timing.mkdir(parents=True, exist_ok=True)
        merged["trt_timing_cache_path"] = str(timing)
    return merged


def parse_provider_options(items: list[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` (the CLI's repeated --provider-option) -> dict; ONNX Runtime takes strings."""
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--provider-option '{item}' is not KEY=VALUE (example: trt_fp16_enable=True)")
        options[key.strip()] = value.strip()
    return options


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    kinds = ("onnx", "early-exit")

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
        if artifact.kind == "early-exit":  # segments behind an exit controller
            from edgesmith.runtimes.early_exit import ort_session

            return ort_session(artifact, **options)  # type: ignore[return-value]
        known = {"provider", "threads", "provider_options", "enable_profiling", "graph_optimization"}
        unknown = set(options) - known
        if unknown:
            raise BadInput(f"onnxruntime: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return OrtSession(artifact, **options)  # type: ignore[arg-type]
