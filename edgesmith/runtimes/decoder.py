"""Decoder sessions: the contract of a causal LM run with a KV cache, whatever runtime runs it.

Each runtime's session lives with its runtime (:class:`edgesmith.runtimes.onnxruntime.OrtDecoderSession`,
:class:`edgesmith.runtimes.torch.TorchDecoderSession`,
:class:`edgesmith.runtimes.llamacpp.LlamaCppDecoderSession`) and declares what it takes and can do
as class attributes (:attr:`DecoderSession.OPTIONS`, :attr:`DecoderSession.MAX_BATCH`); the runtime
opens it (:meth:`edgesmith.runtimes.base.Runtime.load_decoder`), and everything else asks
:func:`edgesmith.runtimes.generation.open_decoder`.

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
  came first). Those are recorded ``meta["decoder"]["padding"] = "right"``: a left-padded prefill
  and :meth:`~DecoderSession.logits` move each row's real tokens to the front before the run (and
  the logits back after it, :func:`right_align`), exact on every real position; later steps keep
  the mask as it was, since the graph reads only its row sums (each row's next cache slot and
  position) and its length.
- :class:`TorchDecoderSession` runs a Hugging Face causal LM with a ``DynamicCache`` in a manual
  loop: the PyTorch baseline, and the reference the export is validated against.

Every session exposes ``prefill(input_ids, attention_mask) -> last logits``, ``step(next_ids) -> last
logits``, ``logits(input_ids, attention_mask) -> every position's logits`` (for KL divergence
and perplexity), ``extend(next_ids, keep)`` (several tokens after the cache in one run) and
``rollback(length)`` (forget the last cached positions), both for speculative decoding
(:mod:`edgesmith.runtimes.speculative`), and report the providers they really run on.

:func:`generate` applies the chat template (instruct models), streams text through a callback
(decoded incrementally, so a character split over several byte-level tokens is printed once it is
whole) and stops on stop tokens or stop strings; :func:`decode_loop` is the batched loop beneath it
(left padding). ONNX Runtime's intra-op threads spin while waiting for work by default; decoder
sessions turn spinning off (``allow_spinning=False``; numbers at :data:`edgesmith.runtimes.onnxruntime_decoder.DEFAULT_ALLOW_SPINNING`).
PyTorch's OpenMP threads spin the same way, and worse: run the torch baseline with
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine (set before torch starts; at load ~9 on 2 cores,
threads = 2 decoded SmolLM2 at 0.5 tokens/s with OpenMP's default and 8.7 with PASSIVE).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Session

log = logging.getLogger(__name__)

#: the decoder graphs' input that picks how many last positions get logits
LOGITS_TO_KEEP = "logits_to_keep"
#: ``meta["decoder"]["padding"]`` of graphs whose contract is right padding (GroupQueryAttention:
#: ORT GenAI folders; "unpadded-only" is what exports before the ``genai`` target recorded)
RIGHT_PADDED = ("right", "unpadded-only")


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

    #: the options the session takes besides ``threads`` (what a profile or ``open_decoder`` may pass)
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: the most rows one call may hold (None: any batch); scorers split larger batches into rows
    MAX_BATCH: ClassVar[int | None] = None
    #: how a batch of prompts of different lengths runs (a batched profile records it)
    BATCHING: ClassVar[str] = "edgesmith's loop: rows left-padded into one batch, prefill then step"

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
        out = self._full(ids, mask, positions_from_mask(mask))
        if out.ndim != 3 or out.shape[1] != ids.shape[1]:
            raise BadInput(f"{type(self).__name__} gave logits of shape {list(out.shape)} for {ids.shape[1]} tokens; "
                           "scoring needs logits for every position (re-export with logits: all)")
        return out

    def reserve(self, rows: int, positions: int) -> None:
        """Make room for batches of up to ``rows`` sequences of up to ``positions`` positions each,
        before anything is timed (a batched profile asks first, so no allocation lands in a timed
        round); one line when the session cannot: more rows than :attr:`MAX_BATCH`, or more
        positions than the context. Sessions whose cache is sized up front (llama.cpp) grow it here."""
        if rows < 1:
            raise BadInput(f"a batch needs at least one row (got {rows})")
        if self.MAX_BATCH is not None and rows > self.MAX_BATCH:
            raise BadInput(f"batch {rows} is more than {type(self).__name__} runs at once ({self.MAX_BATCH} rows); "
                           f"give batch sizes up to {self.MAX_BATCH}")
        self._check_length(positions)

    def decode_rows(self, rows: Sequence[Sequence[int]], new_tokens: int, pad_id: int):
        """A static batch in the runtime's own batched loop, for runtimes that have one (their own
        padding, their own generator): every row (a prompt's token ids, lengths may differ)
        generates ``new_tokens`` greedy tokens, EOS ignored, and the result is a
        :class:`~edgesmith.runtimes.generation.DecodeRun` (tokens [rows, new_tokens], the batch's
        TTFT, one latency per later step). None (the default): edgesmith's loop runs the batch, rows
        left-padded, :meth:`prefill` then :meth:`step`
        (:func:`~edgesmith.runtimes.generation.decode_static_batch`)."""
        return None

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


def check_context(prompt_tokens: list[int], new_tokens: int, max_positions: int | None, name: str) -> None:
    """Every prompt fits the context, and the decode prompt with its new tokens: else one line."""
    if not max_positions:
        return
    longest = max(prompt_tokens)
    if longest > max_positions:
        raise BadInput(f"{name}: a prompt of {longest} tokens is longer than the model's context of {max_positions} "
                       f"tokens; give --prompt-tokens of at most {max_positions}")
    first = prompt_tokens[0]
    if first + new_tokens - 1 > max_positions:
        raise BadInput(f"{name}: {first} prompt tokens + {new_tokens} new tokens exceed the model's context of "
                       f"{max_positions}; lower --new-tokens to {max_positions - first + 1} or the first prompt length")
