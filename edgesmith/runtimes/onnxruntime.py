"""ONNX Runtime: loads an OnnxModel on an execution provider and proves which one it runs on
(onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing; here a session
asked for CUDA that got the CPU provider is refused). A decoder runs in :class:`OrtDecoderSession`.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import BadInput, first_line
from edgesmith.runtimes.base import Availability, Runtime, Session, kind_session, register_runtime
from edgesmith.runtimes.decoder import (
    LOGITS_TO_KEEP,
    RIGHT_PADDED,
    DecoderSession,
    padded_before_tokens,
    positions_from_mask,
    right_align,
)
from edgesmith.runtimes.mlas_check import check_asymmetric_int4
from edgesmith.tensorrt.ep import tensorrt_ep_options

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


class OrtSession(Session):
    runtime = "onnxruntime"
    times_on_device = True  # on the GPU providers

    def __init__(self, model: OnnxModel, *, provider: str = "cpu", threads: int | None = None,
                 provider_options: dict | None = None, enable_profiling: bool = False,
                 graph_optimization: str = "all", profile_file_prefix: str | None = None):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise BadInput(f"unknown execution provider '{provider}'; use one of: {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise BadInput(f"ONNX Runtime here has no {wanted} (installed: {', '.join(ort.get_available_providers())}); "
                           "install onnxruntime-gpu (edgesmith[gpu]) for cuda/tensorrt")
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
        try:
            self.session = ort.InferenceSession(str(model.path), sess_options=so, providers=providers_arg)
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            raise BadInput(f"{model.path}: ONNX Runtime cannot load it ({first_line(exc)[:300]})") from exc
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

#: ORT intra-op spinning for decoder sessions: off. SmolLM2 FP32, threads = 2, prompt 128, 64 new tokens, the
#: shared 2-core machine at load ~2.5: 20.1 tokens/s and TTFT 243 ms without spinning, 11.7 tokens/s and 416 ms
#: with it (at load ~9: 9.1 against 5.8); spinning threads fight whatever else runs for the two cores.
DEFAULT_ALLOW_SPINNING = False
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def decoder_meta(model: OnnxModel) -> dict[str, Any]:
    """``meta["decoder"]`` of an ONNX decoder, or what its config.json says where that is missing."""
    meta = dict((model.meta or {}).get("decoder") or {})
    if meta:
        return meta
    config_path = model.folder / "config.json" if model.folder is not None else None
    if config_path is not None and config_path.exists():
        import json

        config = json.loads(config_path.read_text())
        eos = config.get("eos_token_id")
        meta = {"vocab_size": config.get("vocab_size"),
                "max_positions": config.get("max_position_embeddings") or config.get("n_positions"),
                "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
                "bos_token_id": config.get("bos_token_id"), "pad_token_id": config.get("pad_token_id")}
    return meta


class OrtDecoderSession(DecoderSession):
    """An ONNX decoder in ONNX Runtime with the KV cache kept as OrtValues between steps."""

    runtime = "onnxruntime"
    OPTIONS = ("provider", "allow_spinning", "graph_optimization")
    #: shared KV buffers (genai layout): at least this many positions, and room for this many
    #: tokens past the prompt before the first doubling (SmolLM2: 46 KB a position for all layers)
    kv_min_capacity = 256
    kv_margin = 64

    def __init__(self, model: OnnxModel, *, provider: str = "cpu", threads: int | None = None,
                 allow_spinning: bool = DEFAULT_ALLOW_SPINNING, graph_optimization: str = "all",
                 enable_profiling: bool = False):
        super().__init__()
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise BadInput(f"unknown execution provider '{provider}'; use one of: {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise BadInput(f"ONNX Runtime here has no {wanted} (installed: {', '.join(ort.get_available_providers())}); "
                           "install onnxruntime-gpu for cuda")
        check_asymmetric_int4(model.path, provider=provider)
        so = session_options(threads=threads, graph_optimization=graph_optimization,
                             spinning="default" if allow_spinning else "off", enable_profiling=enable_profiling)
        chain = [wanted] if provider == "cpu" else [wanted, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model.path), sess_options=so, providers=chain)
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            raise BadInput(f"{model.path}: ONNX Runtime cannot load it ({first_line(exc)[:300]})") from exc
        self.providers = list(self.session.get_providers())
        if self.providers[0] != wanted:
            raise BadInput(f"ONNX Runtime fell back to {self.providers[0]} although {wanted} was asked for; "
                           "fix the GPU install or use provider cpu")
        self._ort = ort
        self.model = model
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.options = {"provider": provider, "threads": threads, "allow_spinning": allow_spinning,
                        "graph_optimization": graph_optimization, "kv_cache": "io-binding"}
        inputs, self._outputs = {i.name: i for i in self.session.get_inputs()}, [o.name for o in self.session.get_outputs()]
        self._past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        self._no_cache = (f"{model.path}: not a decoder with a KV cache (inputs: {', '.join(inputs)}); export the "
                          "causal LM with edgesmith export MODEL --to onnx")
        if "input_ids" not in inputs or "attention_mask" not in inputs:
            raise BadInput(self._no_cache)
        self._present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self._past_names]
        missing = [n for n in self._present_names if n not in self._outputs]
        if "logits" not in self._outputs or 0 < len(missing) < len(self._present_names):
            raise BadInput(f"{model.path}: outputs lack {', '.join(missing or ['logits'])}; not the edgesmith decoder layout")
        #: without a cache in and out the graph scores whole sequences (``logits``, empty past fed) but cannot generate
        self.has_cache = bool(self._past_names) and not missing
        self._present_names = self._present_names if self.has_cache else []
        self._has_positions = "position_ids" in inputs
        self._has_keep = LOGITS_TO_KEEP in {*inputs, *(i.name for i in self.session.get_overridable_initializers())}
        first = inputs[self._past_names[0]] if self._past_names else None
        self._cache_dtype = _ORT_FLOAT_TYPES.get(first.type) if first is not None else np.float32
        if first is not None and self._cache_dtype is None:
            raise BadInput(f"{model.path}: KV cache of type {first.type} is not supported (float32 or float16)")
        self._empty = {n: self._empty_past(inputs[n]) for n in self._past_names}
        meta = decoder_meta(model)
        self.num_layers = len(self._past_names) // 2
        self.vocab_size = int(meta.get("vocab_size") or 0)
        self.max_positions = meta.get("max_positions")
        self.eos_token_ids = [int(t) for t in meta.get("eos_token_ids") or []]
        self.pad_token_id = meta.get("pad_token_id")
        # GroupQueryAttention graphs (ORT GenAI's layout) take each row's positions and cache slots
        # from the mask's row sums: their contract is right padding (real tokens first)
        self._right_padded = meta.get("padding") in RIGHT_PADDED
        self._layout = meta.get("layout")
        # GroupQueryAttention writes the new keys/values into its past buffer when past and present
        # are one tensor (ORT GenAI's past_present_share_buffer): no copy of the cache per token
        self._shared = self._layout == "genai" and provider == "cpu"
        if self._shared:
            self.options["kv_cache"] = "shared-buffer"
        self._buffers: list[Any] | None = None
        self._capacity = 0
        self._past: list[Any] | None = None
        self._binding = self.session.io_binding()

    def _empty_past(self, arg) -> tuple[int, int]:
        """(kv_heads, head_dim) of a past input: the shape of a prefill's empty past."""
        heads, dim = arg.shape[1], arg.shape[3]
        meta = decoder_meta(self.model)
        heads = heads if isinstance(heads, int) else meta.get("num_kv_heads")
        dim = dim if isinstance(dim, int) else meta.get("head_dim")
        if not isinstance(heads, int) or not isinstance(dim, int):
            raise BadInput(f"{self.model.path}: cannot tell the KV cache's head count and size from {arg.name}; "
                           "re-export the model with edgesmith")
        return (heads, dim)

    def _value(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _bind(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any], keep: int) -> list[Any]:
        """Bind one run's inputs and outputs; returns the input OrtValues (kept alive over the run)."""
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        alive = [self._value(ids), self._value(mask)]
        binding.bind_ortvalue_input("input_ids", alive[0])
        binding.bind_ortvalue_input("attention_mask", alive[1])
        if self._has_positions:
            alive.append(self._value(positions))
            binding.bind_ortvalue_input("position_ids", alive[-1])
        if self._has_keep:
            alive.append(self._value(np.array(keep, dtype=np.int64)))
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, alive[-1])
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        return alive

    def _run(self, ids, mask, positions, past, keep) -> tuple[np.ndarray, list[Any]]:
        alive = self._bind(ids, mask, positions, past, keep)
        self.session.run_with_iobinding(self._binding)
        outs = dict(zip(["logits", *self._present_names], self._binding.get_outputs()))
        del alive
        logits = outs["logits"].numpy()
        return logits.astype(np.float32, copy=False), [outs[n] for n in self._present_names]

    def _empties(self, batch: int) -> list[Any]:
        return [self._value(np.zeros((batch, h, 0, d), dtype=self._cache_dtype)) for h, d in self._empty.values()]

    def _forward(self, ids, mask, positions, *, start, keep):
        if not self.has_cache:
            raise BadInput(self._no_cache)
        if start and self._right_padded and not mask.all():
            return self._prefill_right_padded(ids, mask)
        if self._shared:
            return self._run_shared(ids, mask, start=start, keep=keep)
        past = self._empties(ids.shape[0]) if start else self._past
        logits, self._past = self._run(ids, mask, positions, past, keep)
        return logits

    def _prefill_right_padded(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A left-padded prefill on a right-padding graph: each row's real tokens moved to the front
        (GroupQueryAttention writes them to cache slots 0..len-1 and ropes them from 0), logits kept
        from the shortest row's last token on, each row's own last token picked: [batch, 1, vocab].
        Later steps keep the caller's mask: the graph reads only its row sums and its length."""
        ids, mask, _ = right_align(ids, mask)
        lengths = mask.sum(axis=1)
        keep = int(ids.shape[1] - lengths.min() + 1)
        if self._shared:
            logits = self._run_shared(ids, mask, start=True, keep=keep)
        else:
            logits, self._past = self._run(ids, mask, positions_from_mask(mask), self._empties(ids.shape[0]), keep)
        index = lengths - 1 - (ids.shape[1] - logits.shape[1])
        return logits[np.arange(ids.shape[0]), index][:, None, :]

    def _run_shared(self, ids: np.ndarray, mask: np.ndarray, *, start: bool, keep: int) -> np.ndarray:
        """One run with each layer's past and present bound to the same preallocated buffer
        [batch, kv_heads, capacity, head_dim]; GroupQueryAttention appends in place and reads the
        first ``mask.shape[1]`` positions. The buffer doubles (one copy) when it is full."""
        total = int(mask.shape[1])
        if start or self._buffers is None:
            self._allocate(ids.shape[0], total)
        elif total > self._capacity:
            self._allocate(ids.shape[0], total, keep_from=self._buffers)
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        alive = [self._value(ids), self._value(mask)]
        binding.bind_ortvalue_input("input_ids", alive[0])
        binding.bind_ortvalue_input("attention_mask", alive[1])
        if self._has_keep:
            alive.append(self._value(np.array(keep, dtype=np.int64)))
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, alive[-1])
        for past, present, buffer in zip(self._past_names, self._present_names, self._buffers):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()
        del alive
        return logits.astype(np.float32, copy=False)

    def _allocate(self, batch: int, total: int, keep_from: list[Any] | None = None) -> None:
        capacity = max(self.kv_min_capacity, 1 << (total + self.kv_margin - 1).bit_length())
        if self.max_positions:
            capacity = max(total, min(capacity, int(self.max_positions)))
        buffers = []
        for i, (heads, dim) in enumerate(self._empty.values()):
            array = np.zeros((batch, heads, capacity, dim), dtype=self._cache_dtype)
            if keep_from is not None:
                array[:, :, :self._capacity] = keep_from[i].numpy()
            buffers.append(self._value(array))
        self._buffers, self._capacity = buffers, capacity

    def _full(self, ids, mask, positions):
        if self._right_padded and padded_before_tokens(mask):
            ids, mask, order = right_align(ids, mask)
            logits, _ = self._run(ids, mask, positions_from_mask(mask), self._empties(ids.shape[0]), 0)
            out = np.empty_like(logits)
            np.put_along_axis(out, order[:, :, None], logits, axis=1)
            return out
        logits, _ = self._run(ids, mask, positions, self._empties(ids.shape[0]), 0)
        return logits

    def _truncate(self, length: int) -> None:
        if self._shared:  # GroupQueryAttention reads the mask's length of the shared buffer: nothing to cut
            return
        # OrtValues cannot be viewed in place: one copy of the kept positions (SmolLM2: 46 KB a position)
        self._past = [self._value(v.numpy()[:, :, :length]) for v in self._past]

    def reset(self) -> None:
        super().reset()
        self._past = None
        self._buffers = None
        self._capacity = 0

    def end_profiling(self) -> str:
        return self.session.end_profiling()

    def close(self) -> None:
        self.reset()
        self.session = None


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
