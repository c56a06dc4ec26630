"""PyTorch runtime: runs a TorchModel eagerly on the CPU (CUDA comes with the GPU issue)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, TorchModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime, Session, register_runtime


class TorchSession(Session):
    runtime = "torch"

    def __init__(self, model: TorchModel, *, device: str = "cpu", threads: int | None = None,
                 dtype: str = "fp32"):
        import torch

        if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
            raise BadInput(f"torch device '{device}' is not usable here (no CUDA device); use --device cpu")
        if threads:
            torch.set_num_threads(int(threads))
        self._torch = torch
        self.model = model
        self.module = model.module
        self.device = device
        self.dtype = dtype
        self.providers = [f"torch-{device.split(':')[0]}"]
        self.options = {"device": device, "threads": torch.get_num_threads(), "dtype": dtype,
                        "attention": getattr(getattr(self.module, "config", None), "_attn_implementation", None)}
        self._names = model.input_names
        self._output = model.output_names[0]

    @property
    def input_names(self) -> list[str]:
        return list(self._names)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items() if k in self._names}
        with torch.inference_mode():
            out = self.module(**kwargs)
        if isinstance(out, torch.Tensor):
            tensor = out
        elif isinstance(out, dict) or hasattr(out, "keys"):
            tensor = out[self._output]
        else:
            tensor = out[0]
        return {self._output: tensor.float().cpu().numpy()}


@register_runtime
class TorchRuntime(Runtime):
    name = "torch"
    kinds = ("torch",)

    def availability(self) -> Availability:
        import torch

        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return Availability(True, "", torch.__version__, devices)

    def load(self, artifact: Artifact, **options: Any) -> TorchSession:
        self.check(artifact)
        options = {k: v for k, v in options.items() if v is not None}
        unknown = set(options) - {"device", "threads", "dtype"}
        if unknown:
            raise BadInput(f"torch runtime: unknown option(s) {', '.join(sorted(unknown))}; known: device, threads, dtype")
        return TorchSession(artifact, **options)  # type: ignore[arg-type]
