"""TensorRT (native): deserialise an engine, bind dynamic shapes, run it on device buffers.

Device buffers are torch CUDA tensors (no pycuda, no cuda-python): inputs are copied to the device
on the session's own CUDA stream, the engine is enqueued with ``execute_async_v3`` and outputs are
copied back. :meth:`TensorRTSession.time_run` times one run with CUDA events on that stream, its
inputs already on the device (what the GPU spends on the model, not the host's copies), and
:meth:`TensorRTSession.per_layer` collects per-layer times through TensorRT's ``IProfiler``.

Before anything is deserialised, the engine's record (TensorRT version, GPU name, compute
capability) is checked against this machine (:func:`check_engine_compatible`): an engine built
elsewhere is refused with a clear message, never handed to TensorRT to crash on.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, TensorRTEngine
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime, Session, register_runtime
from edgesmith.tensorrt.identity import check_engine_compatible, device_identity, import_tensorrt

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, tdt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dtype not in table:
        raise BadInput(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


def profile_ranges(engine, inputs: list[str]) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Per optimization profile: input name -> (min, opt, max) shapes, read back from the engine."""
    ranges = []
    for p in range(engine.num_optimization_profiles):
        ranges.append({name: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, p))
                       for name in inputs})
    return ranges


def pick_profile(ranges: list[dict[str, tuple]], shapes: dict[str, tuple[int, ...]]) -> int:
    """The first profile whose min/max hold every input shape; :class:`BadInput` naming the ranges if none."""
    for index, profile in enumerate(ranges):
        if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], profile[n][0], profile[n][2])) for n in shapes):
            return index
    described = "; ".join(", ".join(f"{n} {r[0]}..{r[2]}" for n, r in p.items()) for p in ranges)
    wanted = ", ".join(f"{n} {s}" for n, s in shapes.items())
    raise BadInput(f"input shapes {wanted} lie outside every optimization profile of the engine ({described}); "
                   "rebuild it with --shapes that cover them")


class TensorRTSession(Session):
    runtime = "tensorrt"
    times_on_device = True

    def __init__(self, model: TensorRTEngine, *, device: str = "cuda"):
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BadInput("the TensorRT runtime needs a CUDA device (and a CUDA build of torch for its buffers); "
                           "none is visible here")
        index = int(device.split(":")[1]) if ":" in device else 0
        check_engine_compatible(model.engine_meta, device_identity(index), where=f"engine {model.folder}")
        torch.cuda.set_device(index)
        self._trt, self._torch = trt, torch
        self.model = model
        self.device = f"cuda:{index}"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(model.path.read_bytes())
        if engine is None:
            raise BadInput(f"TensorRT could not deserialise {model.path} (damaged file, or built by another "
                           "TensorRT); rebuild it with `edgesmith export MODEL.onnx --to tensorrt`")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self._ranges = profile_ranges(engine, self._inputs)
        self._profile = 0
        self._stream = torch.cuda.Stream()
        self._staged: dict[int, dict[str, Any]] = {}
        self.providers = ["TensorRT"]
        self.options = {"device": self.device, "tensorrt_version": trt.__version__,
                        "precision": model.engine_meta.get("precision"),
                        "profiles": len(self._ranges),
                        "timing": "CUDA events on the session's stream; inputs already on the device"}

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    # -- buffers ------------------------------------------------------------------------------
    def _to_device(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise BadInput(f"the engine needs input(s) {', '.join(missing)}")
        torch = self._torch
        with torch.cuda.stream(self._stream):
            return {n: torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device, self._dtypes[n],
                                                                          non_blocking=False)
                    for n in self._inputs}

    def _bind(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Select the profile that holds these shapes, set them, allocate outputs, set every address."""
        torch = self._torch
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        profile = pick_profile(self._ranges, shapes)
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self._stream.cuda_stream)
            self._profile = profile
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise BadInput(f"TensorRT refused shape {tuple(tensor.shape)} for input {name}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self._outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BadInput(f"TensorRT could not infer the shape of output {name} from the inputs given")
            outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise BadInput("TensorRT failed to enqueue the engine (see its log above)")

    # -- running ------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = self._to_device(feeds)
        outputs = self._bind(inputs)
        self._enqueue()
        self._stream.synchronize()
        return {n: t.float().cpu().numpy() for n, t in outputs.items()}

    def _staged_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        key = id(feeds)
        if key not in self._staged:
            self._staged[key] = self._to_device(feeds)
        return self._staged[key]

    def time_run(self, feeds: dict[str, np.ndarray]) -> float:
        """One run timed with CUDA events (ms), its inputs staged on the device once per feed."""
        torch = self._torch
        inputs = self._staged_inputs(feeds)
        self._stream.synchronize()
        self._bind(inputs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self._stream)
        self._enqueue()
        end.record(self._stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        self._stream.synchronize()

    def device_memory_mb(self) -> float | None:
        """Device memory the engine's context needs plus the buffers torch allocated (MiB)."""
        torch = self._torch
        context_bytes = int(getattr(self.engine, "device_memory_size_v2", getattr(self.engine, "device_memory_size", 0)))
        return round((context_bytes + torch.cuda.max_memory_allocated()) / 2**20, 1)

    def per_layer(self, feeds: list[dict[str, np.ndarray]], runs: int) -> list[dict[str, Any]]:
        """Mean ms per run of every engine layer over ``runs`` runs, through TensorRT's IProfiler,
        in a second execution context so the timed one is never slowed."""
        if runs < 1:
            raise BadInput(f"per-layer runs must be at least 1 (got {runs})")
        trt = self._trt
        recorder = _layer_recorder(trt)
        timed_context = self.context
        self.context = self.engine.create_execution_context()
        self._profile = 0
        self.context.profiler = recorder
        try:
            self.run(feeds[0])  # first run: allocations, not recorded
            recorder.reset()
            for i in range(runs):
                self.run(feeds[i % len(feeds)])
        finally:
            self.context = timed_context
            self._profile = -1  # force the timed context to select its profile again
        types = self._layer_types()
        return [{"name": name, "op_type": types.get(name, "layer"), "ms": total / runs,
                 "calls": max(1, recorder.calls[name] // runs), "provider": "TensorRT"}
                for name, total in recorder.totals.items()]

    def _layer_types(self) -> dict[str, str]:
        import json

        trt = self._trt
        try:
            inspector = self.engine.create_engine_inspector()
            info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        except Exception:  # inspector output depends on the build's profiling verbosity
            log.debug("engine inspector unavailable", exc_info=True)
            return {}
        return {layer["Name"]: str(layer.get("LayerType", "layer")) for layer in info.get("Layers", [])
                if isinstance(layer, dict) and "Name" in layer}

    def close(self) -> None:
        self._staged.clear()
        self.context = None
        self.engine = None


def _layer_recorder(trt):
    """An ``IProfiler`` that sums each layer's reported time."""

    class LayerTimes(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.reset()

        def reset(self) -> None:
            self.totals: dict[str, float] = {}
            self.calls: dict[str, int] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.totals[layer_name] = self.totals.get(layer_name, 0.0) + float(ms)
            self.calls[layer_name] = self.calls.get(layer_name, 0) + 1

    return LayerTimes()


def tensorrt_per_layer(artifact: Artifact, options: dict[str, Any], feeds: list[dict[str, np.ndarray]],
                       runs: int) -> list[dict[str, Any]]:
    """Per-layer mean times of a TensorRT engine through TensorRT's IProfiler, in a separate session
    (the runtime's per-op profiler, :data:`edgesmith.runtimes.base.PER_OP_PROFILERS`)."""
    session = TensorRTRuntime().load(artifact, **options)
    try:
        return session.per_layer(feeds, runs)
    finally:
        session.close()


@register_runtime
class TensorRTRuntime(Runtime):
    name = "tensorrt"
    kinds = ("tensorrt",)
    builds_on_device = True  # a device profile builds the engine there (trtexec) from the ONNX source

    def availability(self) -> Availability:
        try:
            trt = import_tensorrt()
        except BadInput as exc:
            return Availability(False, str(exc))
        import torch

        if torch.version.cuda is None:
            return Availability(False, "torch is a CPU build; the TensorRT runtime keeps its buffers in torch CUDA "
                                       "tensors: install a CUDA build of torch", trt.__version__)
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device visible", trt.__version__)
        return Availability(True, "", trt.__version__,
                            [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())])

    def load(self, artifact: Artifact, **options: Any) -> TensorRTSession:
        self.check(artifact)
        options = {k: v for k, v in options.items() if v is not None}
        provider = options.pop("provider", None)
        if provider not in (None, "cpu", "cuda", "tensorrt"):
            raise BadInput(f"tensorrt runtime: provider '{provider}' makes no sense here; engines run on CUDA")
        options.pop("threads", None)  # host threads do not apply to an engine
        unknown = set(options) - {"device"}
        if unknown:
            raise BadInput(f"tensorrt runtime: unknown option(s) {', '.join(sorted(unknown))}; known: device")
        device = str(options.get("device", "cuda"))
        if not device.startswith("cuda"):
            raise BadInput(f"tensorrt runtime: device '{device}' is not a CUDA device; use cuda or cuda:N")
        return TensorRTSession(artifact, device=device)  # type: ignore[arg-type]

