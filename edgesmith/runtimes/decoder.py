"""Decoder sessions: a causal LM run with a KV cache, in ONNX Runtime or PyTorch.

A *decoder session* runs a causal LM one prefill and then one token per step, keeping its KV cache
between calls:

- :class:`OrtDecoderSession` runs an ONNX decoder in the edgesmith layout (``input_ids``,
  ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` -> ``logits``,
  ``present.{i}.key|value``; written by :mod:`edgesmith.export.decoder`). The cache stays in ONNX
  Runtime's memory: each step binds the previous step's ``present`` OrtValues as the next step's
  ``past`` inputs (IO binding), so no token copies the cache out to numpy and back. The graph still
  concatenates past and new keys inside (that layout has no shared buffer). On the CPU this gains
  nothing measurable (SmolLM2-135M FP32, 2 threads: 20.1 against 21.3 tokens/s for ``session.run``
  with numpy feeds at a 128-token prompt, 14.5-14.8 against 14.1-15.1 at 1024; the cache is 46 KB
  a token beside 540 MB of weights read per token), but it keeps the cache on the device for the
  CUDA provider and costs nothing here.
  During prefill it asks for the last position's logits only (the graph's ``logits_to_keep`` input):
  SmolLM2's prefill of 128 tokens takes 239 ms so against 271 ms with every position's logits.
  It also runs the ``genai`` layout (ORT GenAI's builder graphs, :mod:`edgesmith.export.decoder_genai`:
  no ``position_ids``, GroupQueryAttention takes positions from the mask as if every row's tokens
  came first). Those are recorded ``meta["decoder"]["padding"] = "unpadded-only"``: a padded prefill
  is refused (one line, exit 2), and :meth:`~DecoderSession.logits` moves each row's real tokens to
  the front before the run and its logits back after it (:func:`right_align`), exact on every real
  position.
- :class:`TorchDecoderSession` runs a Hugging Face causal LM with a ``DynamicCache`` in a manual
  loop: the PyTorch baseline, and the reference the export is validated against.

Both expose ``prefill(input_ids, attention_mask) -> last logits``, ``step(next_ids) -> last
logits``, ``logits(input_ids, attention_mask) -> every position's logits`` (for KL divergence
and perplexity), ``extend(next_ids, keep)`` (several tokens after the cache in one run) and
``rollback(length)`` (forget the last cached positions), both for speculative decoding
(:mod:`edgesmith.runtimes.speculative`), and report the providers they really run on.

:func:`generate` applies the chat template (instruct models), streams text through a callback
(decoded incrementally, so a character split over several byte-level tokens is printed once it is
whole) and stops on stop tokens or stop strings; :func:`decode_loop` is the batched loop beneath it
(left padding). ONNX Runtime's intra-op threads spin while waiting for work by default; decoder
sessions turn spinning off (``allow_spinning=False``; numbers at :data:`DEFAULT_ALLOW_SPINNING`).
PyTorch's OpenMP threads spin the same way, and worse: run the torch baseline with
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine (set before torch starts; at load ~9 on 2 cores,
threads = 2 decoded SmolLM2 at 0.5 tokens/s with OpenMP's default and 8.7 with PASSIVE).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, OnnxModel, TorchModel
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Session
from edgesmith.runtimes.onnxruntime import PROVIDERS

log = logging.getLogger(__name__)

#: ORT intra-op spinning for decoder sessions: off. SmolLM2 FP32, threads = 2, prompt 128, 64 new
#: tokens, the shared 2-core machine at load ~2.5: 20.1 tokens/s and TTFT 243 ms without spinning,
#: 11.7 tokens/s and 416 ms with it (at load ~9: 9.1 against 5.8 tokens/s); spinning threads
#: fight whatever else runs (the other runtime of a comparison, other jobs) for the two cores.
DEFAULT_ALLOW_SPINNING = False
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
LOGITS_TO_KEEP = "logits_to_keep"
_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids for (left-)padded rows: cumsum(mask) - 1, clipped at 0 (as HF generate)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Decoder sessions
# ---------------------------------------------------------------------------------------------


class DecoderSession(Session):
    """A causal LM with a KV cache. ``prefill`` starts a new sequence batch (left padding in
    ``attention_mask``), ``step`` appends one token per row; both return the last position's logits
    [batch, vocab] as float32. ``logits`` runs a whole batch without touching the cache."""

    num_layers: int
    vocab_size: int
    max_positions: int | None = None
    eos_token_ids: list[int]
    pad_token_id: int | None = None

    def __init__(self) -> None:
        self._mask: np.ndarray | None = None
        self._next_position: np.ndarray | None = None

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"]

    @property
    def past_length(self) -> int:
        """Tokens in the cache (padding included): the attention mask's length."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every position's logits for a batch (no cache): what generic comparisons call."""
        return {"logits": self.logits(feeds["input_ids"], feeds.get("attention_mask"))}

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = _check_batch(input_ids, attention_mask)
        self.reset()
        positions = positions_from_mask(mask)
        out = self._forward(ids, mask, positions, start=True, keep=1)
        self._mask = mask
        self._next_position = positions[:, -1:] + 1
        return out[:, -1, :]

    def step(self, next_ids: np.ndarray) -> np.ndarray:
        if self._mask is None:
            raise BadInput("step() before prefill(): start a sequence with prefill(input_ids, attention_mask)")
        ids = np.asarray(next_ids, dtype=np.int64).reshape(-1, 1)
        if ids.shape[0] != self._mask.shape[0]:
            raise BadInput(f"step() got {ids.shape[0]} tokens for a batch of {self._mask.shape[0]}")
        mask = np.concatenate([self._mask, np.ones_like(ids)], axis=1)
        self._check_length(mask.shape[1])
        out = self._forward(ids, mask, self._next_position, start=False, keep=1)
        self._mask = mask
        self._next_position = self._next_position + 1
        return out[:, -1, :]

    def extend(self, next_ids: np.ndarray, keep: int = 1) -> np.ndarray:
        """Append several tokens per row after the cache in one run (``next_ids`` [batch, n]): the
        last ``keep`` positions' logits [batch, keep, vocab]. Speculative decoding verifies drafts so."""
        if self._mask is None:
            raise BadInput("extend() before prefill(): start a sequence with prefill(input_ids, attention_mask)")
        ids = np.ascontiguousarray(np.asarray(next_ids, dtype=np.int64))
        ids = ids[None, :] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != self._mask.shape[0] or ids.shape[1] == 0:
            raise BadInput(f"extend() needs [batch={self._mask.shape[0]}, n >= 1] token ids, got shape {ids.shape}")
        n = ids.shape[1]
        keep = max(1, min(int(keep), n))
        mask = np.concatenate([self._mask, np.ones_like(ids)], axis=1)
        self._check_length(mask.shape[1])
        positions = self._next_position + np.arange(n, dtype=np.int64)[None, :]
        out = self._forward(ids, mask, positions, start=False, keep=keep)
        self._mask = mask
        self._next_position = self._next_position + n
        return out[:, -keep:, :]

    def rollback(self, length: int) -> None:
        """Forget every cached position from ``length`` on (``past_length`` counts padding too): the
        tokens appended last are dropped, as if they had never been fed (rejected draft tokens)."""
        if self._mask is None:
            raise BadInput("rollback() before prefill(): there is no cache to roll back")
        total = self.past_length
        if not 1 <= length <= total:
            raise BadInput(f"rollback({length}): the cache holds {total} positions; roll back to 1..{total}")
        drop = total - int(length)
        if drop == 0:
            return
        if not self._mask[:, length:].all():
            raise BadInput("rollback() can only drop tokens appended after the prompt (they hold no padding)")
        self._truncate(int(length))
        self._mask = self._mask[:, :length]
        self._next_position = self._next_position - drop

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        ids, mask = _check_batch(input_ids, attention_mask)
        self._check_length(mask.shape[1])
        return self._full(ids, mask, positions_from_mask(mask))

    def reset(self) -> None:
        self._mask = None
        self._next_position = None

    def _check_length(self, total: int) -> None:
        if self.max_positions and total > self.max_positions:
            raise BadInput(f"{total} tokens exceed the model's context of {self.max_positions}; "
                           "shorten the prompt or lower max_new_tokens")

    @abstractmethod
    def _forward(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, *, start: bool,
                 keep: int) -> np.ndarray:
        """Run ``ids`` after the cache (``start``: a new sequence); the last ``keep`` positions' logits."""

    @abstractmethod
    def _full(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Every position's logits of ``ids``, without touching the cache."""

    def _truncate(self, length: int) -> None:
        """Keep the cache's first ``length`` positions only (speculative decoding needs it)."""
        raise BadInput(f"{type(self).__name__} cannot roll back its KV cache; speculative decoding runs on the "
                       "onnxruntime and torch decoder sessions")


def _check_batch(input_ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise BadInput(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != ids.shape:
        raise BadInput(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if (mask.sum(axis=1) == 0).any():
        raise BadInput("a row of attention_mask is all padding; every prompt needs at least one token")
    return ids, np.ascontiguousarray(mask)


def right_align(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's real tokens moved to the front (padding after them), in order: ``(ids, mask,
    order)`` with ``new[i] = old[i, order[i]]``; ``out[i, order[i]] = result[i]`` undoes it."""
    order = np.argsort(1 - mask, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(mask, order, axis=1), order


def padded_before_tokens(mask: np.ndarray) -> bool:
    """Whether some row has padding before one of its real tokens (left or inner padding)."""
    return bool((np.diff(mask, axis=1) > 0).any())


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
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if graph_optimization not in levels:
            raise BadInput(f"graph_optimization must be one of {', '.join(levels)}")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        so.graph_optimization_level = levels[graph_optimization]
        so.enable_profiling = enable_profiling
        so.log_severity_level = 3
        chain = [wanted] if provider == "cpu" else [wanted, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model.path), sess_options=so, providers=chain)
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            raise BadInput(f"{model.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        self.providers = list(self.session.get_providers())
        if self.providers[0] != wanted:
            raise BadInput(f"ONNX Runtime fell back to {self.providers[0]} although {wanted} was asked for; "
                           "fix the GPU install or use provider cpu")
        self._ort = ort
        self.model = model
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.options = {"provider": provider, "threads": threads, "allow_spinning": allow_spinning,
                        "graph_optimization": graph_optimization, "kv_cache": "io-binding"}
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        if "input_ids" not in inputs or "attention_mask" not in inputs or not self._past_names:
            raise BadInput(f"{model.path}: not a decoder with a KV cache (inputs: {', '.join(inputs)}); export the "
                           "causal LM with edgesmith export MODEL --to onnx")
        self._present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self._past_names]
        missing = [n for n in self._present_names if n not in self._outputs]
        if missing or "logits" not in self._outputs:
            raise BadInput(f"{model.path}: outputs lack {', '.join(missing or ['logits'])}; not the edgesmith decoder layout")
        self._has_positions = "position_ids" in inputs
        self._has_keep = LOGITS_TO_KEEP in inputs
        first = inputs[self._past_names[0]]
        self._cache_dtype = _ORT_FLOAT_TYPES.get(first.type)
        if self._cache_dtype is None:
            raise BadInput(f"{model.path}: KV cache of type {first.type} is not supported (float32 or float16)")
        self._empty = {n: self._empty_past(inputs[n]) for n in self._past_names}
        meta = decoder_meta(model)
        self.num_layers = len(self._past_names) // 2
        self.vocab_size = int(meta.get("vocab_size") or 0)
        self.max_positions = meta.get("max_positions")
        self.eos_token_ids = [int(t) for t in meta.get("eos_token_ids") or []]
        self.pad_token_id = meta.get("pad_token_id")
        self._unpadded_only = meta.get("padding") == "unpadded-only"
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
        if start and self._unpadded_only and not mask.all():
            raise BadInput(f"{self.model.path}: this {self._layout or 'unpadded-only'}-layout decoder (ORT GenAI's "
                           "builder graph) cannot run a padded batch with a KV cache (its attention takes positions "
                           "from the mask); generate one prompt at a time or export with backend dynamo")
        if self._shared:
            return self._run_shared(ids, mask, start=start, keep=keep)
        past = self._empties(ids.shape[0]) if start else self._past
        logits, self._past = self._run(ids, mask, positions, past, keep)
        return logits

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
        if self._unpadded_only and padded_before_tokens(mask):
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


class TorchDecoderSession(DecoderSession):
    """A Hugging Face causal LM in a manual KV-cache loop (``DynamicCache``), the PyTorch baseline.

    ``threads`` sets torch's intra-op threads for the whole process (torch has no per-model
    setting). The module runs as it is (its attention implementation, dtype and device)."""

    runtime = "torch"

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


def load_decoder(artifact: Artifact, *, threads: int | None = None, **options: Any) -> DecoderSession:
    """The decoder session for an artifact: ONNX Runtime for an OnnxModel, PyTorch for a TorchModel."""
    if isinstance(artifact, OnnxModel):
        return OrtDecoderSession(artifact, threads=threads, **options)
    if isinstance(artifact, TorchModel):
        if artifact.task != "text-generation":
            raise BadInput(f"{artifact.name} is a {artifact.task} model; generation needs a causal LM (text-generation)")
        if options:
            raise BadInput(f"torch decoder sessions take no option(s) {', '.join(sorted(options))}")
        return TorchDecoderSession(artifact, threads=threads)
    raise BadInput(f"{artifact.name}: cannot generate with a {artifact.kind} artifact; use a causal LM or its ONNX export")


