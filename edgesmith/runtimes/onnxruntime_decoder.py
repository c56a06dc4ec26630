"""ONNX Runtime's decoder session keeps an ONNX causal LM's KV cache inside ONNX Runtime.

The cache stays as OrtValues between steps (IO binding), or in one shared buffer per layer for
GroupQueryAttention graphs (ORT GenAI folders, right padding). Registered as the ``onnxruntime`` runtime's decoder session
(:mod:`edgesmith.runtimes.onnxruntime`).

Layer L2 (a runtime): imports artifacts, errors and the runtime base modules only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgesmith.artifacts import OnnxModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.decoder import (
    LOGITS_TO_KEEP,
    RIGHT_PADDED,
    DecoderSession,
    padded_before_tokens,
    positions_from_mask,
    right_align,
)
from edgesmith.runtimes.mlas_check import check_asymmetric_int4
from edgesmith.runtimes.onnxruntime_options import open_session, session_options, wanted_provider

log = logging.getLogger(__name__)

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

        wanted = wanted_provider(provider)
        check_asymmetric_int4(model.path, provider=provider)
        so = session_options(threads=threads, graph_optimization=graph_optimization,
                             spinning="default" if allow_spinning else "off", enable_profiling=enable_profiling)
        chain = [wanted] if provider == "cpu" else [wanted, "CPUExecutionProvider"]
        self.session = open_session(model.path, so, chain, wanted)
        self.providers = list(self.session.get_providers())
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

    def _bind_tokens(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None, keep: int) -> list[Any]:
        """Clear the binding and bind one run's token inputs (ids, mask, positions where the graph
        takes them, logits_to_keep); returns their OrtValues (kept alive over the run)."""
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        alive = [self._value(ids), self._value(mask)]
        binding.bind_ortvalue_input("input_ids", alive[0])
        binding.bind_ortvalue_input("attention_mask", alive[1])
        if self._has_positions and positions is not None:
            alive.append(self._value(positions))
            binding.bind_ortvalue_input("position_ids", alive[-1])
        if self._has_keep:
            alive.append(self._value(np.array(keep, dtype=np.int64)))
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, alive[-1])
        return alive

    def _bind(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any], keep: int) -> list[Any]:
        """Bind one run's inputs and outputs; returns the input OrtValues (kept alive over the run)."""
        binding = self._binding
        alive = self._bind_tokens(ids, mask, positions, keep)
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
        alive = self._bind_tokens(ids, mask, None, keep)  # GroupQueryAttention takes positions from the mask
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
