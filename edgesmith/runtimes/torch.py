"""PyTorch runtime: a TorchModel on the CPU or a CUDA device, in fp32, fp16 or bf16, eager or
compiled (``torch.compile``), optionally replayed from CUDA graphs.

The artifact's module is never changed: a session that moves, casts or compiles works on a copy.
On CUDA, :meth:`TorchSession.time_run` times one run with CUDA events (inputs already on the
device, after synchronisation), and ``peak device memory`` comes from torch's allocator.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, TorchModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime, Session, kind_session, register_runtime
from edgesmith.runtimes.decoder import DecoderSession

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16")
#: torch.compile modes: "reduce-overhead" replays CUDA graphs, "default" leaves them out (both
#: compile in seconds to a minute; the max-autotune modes benchmark kernels for many minutes)
COMPILE_MODES = {True: "reduce-overhead", False: "default"}


def torch_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise BadInput(f"torch dtype '{name}' is not one of {', '.join(DTYPES)}")
    return table[name]


def check_device(device: str) -> None:
    """:class:`BadInput` unless ``device`` is "cpu" or a CUDA device that exists here."""
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise BadInput(f"torch device '{device}' is not cpu, cuda or cuda:N")
    if torch.version.cuda is None:
        raise BadInput(f"torch device '{device}': this torch ({torch.__version__}) is a CPU build; install a CUDA "
                       "build of torch, or use --device cpu")
    if not torch.cuda.is_available():
        raise BadInput(f"torch device '{device}': no CUDA device is visible (driver missing or "
                       "CUDA_VISIBLE_DEVICES empty); use --device cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise BadInput(f"torch device '{device}': only {torch.cuda.device_count()} CUDA device(s) here")


class TorchSession(Session):
    runtime = "torch"
    times_on_device = True  # on CUDA

    def __init__(self, model: TorchModel, *, device: str = "cpu", threads: int | None = None,
                 dtype: str = "fp32", compile: bool = False, cuda_graphs: bool = False):
        import torch

        check_device(device)
        dt = torch_dtype(dtype)
        if cuda_graphs and device == "cpu":
            raise BadInput("CUDA graphs need a CUDA device; use --device cuda or leave out --cuda-graphs")
        if dtype == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise BadInput(f"this GPU ({torch.cuda.get_device_name()}) has no bf16 support; use fp16 or fp32")
        if threads:
            torch.set_num_threads(int(threads))
        self._torch = torch
        self.model = model
        self.device = device if device == "cpu" or ":" in device else "cuda:0"
        self.dtype = dtype
        module = model.module
        if self.device != "cpu" or dtype != "fp32" or compile:
            # the artifact's module stays where and what it was
            module = copy.deepcopy(module).to(self.device, dt).eval()
        self.module = module
        if compile:
            self.module = torch.compile(self.module, mode=COMPILE_MODES[cuda_graphs], dynamic=False)
        self._graphs: dict[tuple, tuple[Any, dict[str, Any], Any]] = {}
        self._use_graphs = cuda_graphs and not compile  # compile's reduce-overhead mode makes its own graphs
        self._staged: dict[int, dict[str, Any]] = {}
        self.providers = [f"torch-{self.device.split(':')[0]}"]
        self.options = {"device": self.device, "threads": torch.get_num_threads(), "dtype": dtype,
                        "compile": COMPILE_MODES[cuda_graphs] if compile else False, "cuda_graphs": cuda_graphs,
                        "attention": getattr(getattr(model.module, "config", None), "_attn_implementation", None)}
        if self.device != "cpu":
            self.options["gpu"] = torch.cuda.get_device_name(self.device)
            self.options["timing"] = "CUDA events after synchronisation; inputs already on the device"
        self._names = model.input_names
        self._output = model.output_names[0]

    @property
    def input_names(self) -> list[str]:
        return list(self._names)

    def _to_device(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        torch = self._torch
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                for k, v in feeds.items() if k in self._names}

    def _select(self, out):
        torch = self._torch
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, dict) or hasattr(out, "keys"):
            return out[self._output]
        return out[0]

    def _forward(self, inputs: dict[str, Any]):
        torch = self._torch
        if not self._use_graphs:
            with torch.inference_mode():
                return self._select(self.module(**inputs))
        key = tuple((k, tuple(v.shape)) for k, v in sorted(inputs.items()))
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static_in, static_out = self._graphs[key]
        for name, tensor in inputs.items():
            static_in[name].copy_(tensor)
        graph.replay()
        return static_out

    def _capture(self, inputs: dict[str, Any]):
        """Record one forward at these shapes into a CUDA graph (warm-up on a side stream first,
        as torch's documentation asks)."""
        torch = self._torch
        static_in = {k: v.clone() for k, v in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                self.module(**static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_out = self._select(self.module(**static_in))
        return graph, static_in, static_out

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensor = self._forward(self._to_device(feeds))
        return {self._output: tensor.float().cpu().numpy()}

    def time_run(self, feeds: dict[str, np.ndarray]) -> float:
        """One run on a CUDA device timed with CUDA events (ms), inputs staged on the device once
        per feed, after synchronisation."""
        torch = self._torch
        if self.device == "cpu":
            raise BadInput("time_run times CUDA work; on the CPU, time session.run")
        key = id(feeds)
        if key not in self._staged:
            self._staged[key] = self._to_device(feeds)
        inputs = self._staged[key]
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self._forward(inputs)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        if self.device != "cpu":
            self._torch.cuda.synchronize(self.device)

    def device_memory_mb(self) -> float | None:
        if self.device == "cpu":
            return None
        return round(self._torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def close(self) -> None:
        self._staged.clear()
        self._graphs.clear()


# ---------------------------------------------------------------------------------------------
# The decoder session
# ---------------------------------------------------------------------------------------------


class TorchDecoderSession(DecoderSession):
    """A Hugging Face causal LM in a manual KV-cache loop (``DynamicCache``), the PyTorch baseline.

    ``threads`` sets torch's intra-op threads for the whole process (torch has no per-model
    setting). The module runs as it is (its attention implementation, dtype and device)."""

    runtime = "torch"
    OPTIONS = ()

    def __init__(self, model: TorchModel | Any, *, threads: int | None = None):
        super().__init__()
        import torch

        module = model.module if isinstance(model, TorchModel) else model
        if module is None or not hasattr(module, "config"):
            raise BadInput("TorchDecoderSession needs a Hugging Face causal LM (a transformers PreTrainedModel)")
        if threads:
            torch.set_num_threads(int(threads))
        self.module = module.eval()
        self._torch = torch
        config = module.config.get_text_config(decoder=True) if hasattr(module.config, "get_text_config") else module.config
        self.config = config
        self.device = str(next(module.parameters()).device)
        self.providers = ["torch-" + self.device.split(":")[0]]
        self.options = {"threads": torch.get_num_threads(), "attention": getattr(config, "_attn_implementation", None),
                        "dtype": str(next(module.parameters()).dtype).removeprefix("torch."), "kv_cache": "DynamicCache"}
        self.num_layers = int(config.num_hidden_layers)
        self.vocab_size = int(config.vocab_size)
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.eos_token_ids = eos_ids_of(module)
        self.pad_token_id = getattr(config, "pad_token_id", None)
        self._cache = None

    def _call(self, ids, mask, positions, cache, keep) -> np.ndarray:
        torch = self._torch
        t = {k: torch.from_numpy(v).to(self.device) for k, v in (("ids", ids), ("mask", mask), ("pos", positions))}
        with torch.inference_mode():
            out = self.module(input_ids=t["ids"], attention_mask=t["mask"], position_ids=t["pos"], cache=cache,
                              use_cache=cache is not None, logits_to_keep=keep)
        return out.logits.float().cpu().numpy()

    def _forward(self, ids, mask, positions, *, start, keep):
        if start:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.module.config)
        return self._call(ids, mask, positions, self._cache, keep)

    def _full(self, ids, mask, positions):
        return self._call(ids, mask, positions, None, 0)

    def _truncate(self, length: int) -> None:
        self._cache.crop(length - self._cache.get_seq_length())  # a negative count: tokens removed

    def reset(self) -> None:
        super().reset()
        self._cache = None

    def close(self) -> None:
        self.reset()


def eos_ids_of(module) -> list[int]:
    """The EOS ids of a Hugging Face model: its generation config's, else its config's."""
    for source in (getattr(module, "generation_config", None), getattr(module, "config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return []


@register_runtime
class TorchRuntime(Runtime):
    name = "torch"
    kinds = ("torch", "early-exit")
    OPTIONS = ("device", "threads", "dtype", "compile", "cuda_graphs")
    device_option = "device"
    decoder_kinds = ("torch",)
    decoder_session = TorchDecoderSession

    def availability(self) -> Availability:
        import torch

        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return Availability(True, "", torch.__version__, devices)

    def load(self, artifact: Artifact, **options: Any) -> TorchSession:
        self.check(artifact)
        options = {k: v for k, v in options.items() if v is not None}
        session = kind_session(self.name, artifact, options)
        if session is not None:
            return session  # type: ignore[return-value]
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise BadInput(f"torch runtime: unknown option(s) {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(self.OPTIONS)}")
        return TorchSession(artifact, **options)  # type: ignore[arg-type]

    def check_decoder(self, artifact: Artifact) -> None:
        super().check_decoder(artifact)
        if artifact.task != "text-generation":
            raise BadInput(f"{artifact.name} is a {artifact.task} model; generation needs a causal LM (text-generation)")
