"""ONNX Runtime: loads an OnnxModel on an execution provider and proves which one it runs on
(onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing; here a session
asked for CUDA that got the CPU provider is refused). A decoder runs in :class:`OrtDecoderSession`
(:mod:`edgesmith.runtimes.onnxruntime_decoder`); session options are :mod:`edgesmith.runtimes.onnxruntime_options`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime, Session, kind_session, register_runtime
from edgesmith.runtimes.onnxruntime_decoder import OrtDecoderSession
from edgesmith.runtimes.onnxruntime_options import (  # noqa: F401 (re-exported)
    GRAPH_OPTIMIZATION,
    PROVIDERS,
    installed_distributions,
    open_session,
    session_options,
    wanted_provider,
)
from edgesmith.tensorrt.ep import tensorrt_ep_options

log = logging.getLogger(__name__)


class OrtSession(Session):
    runtime = "onnxruntime"
    times_on_device = True  # on the GPU providers

    def __init__(self, model: OnnxModel, *, provider: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None, enable_profiling: bool = False,
                 graph_optimization: str = "all", profile_file_prefix: str | None = None):
        import onnxruntime as ort

        wanted = wanted_provider(provider)
        so = session_options(threads=threads, graph_optimization=graph_optimization, enable_profiling=enable_profiling,
                             profile_prefix=profile_file_prefix)
        chain = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
        provider_options = dict(provider_options or {})
        if provider == "tensorrt":
            provider_options = tensorrt_ep_options(model, provider_options)
        if provider_options:
            providers_arg = [(wanted, provider_options)] + chain[1:]
        else:
            providers_arg = chain
        self.session = open_session(model.path, so, providers_arg, wanted)
        self.providers = list(self.session.get_providers())
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


def parse_provider_options(items: list[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` (the CLI's repeated --provider-option) -> dict; ONNX Runtime takes strings."""
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--provider-option '{item}' is not KEY=VALUE (example: trt_fp16_enable=True)")
        options[key.strip()] = value.strip()
    return options

# ---------------------------------------------------------------------------------------------
# The decoder session
# ---------------------------------------------------------------------------------------------

@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    short_name = "ort"
    kinds = ("onnx", "early-exit")
    decoder_kinds = ("onnx",)
    decoder_session = OrtDecoderSession
    decoder_hint = "export it first (edgesmith export MODEL --to onnx)"

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

    def load(self, artifact: Artifact, **options: Any) -> Session:
        self.check(artifact)
        options = {k: v for k, v in options.items() if v is not None}
        session = kind_session(self.name, artifact, options)
        if session is not None:
            return session
        if artifact.task == "text-generation":  # a decoder runs with its KV cache, never as an encoder
            return self.load_decoder(artifact, **options)
        known = {"provider", "threads", "provider_options", "enable_profiling", "graph_optimization", "profile_file_prefix"}
        unknown = set(options) - known
        if unknown:
            raise BadInput(f"onnxruntime: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return OrtSession(artifact, **options)  # type: ignore[arg-type]
