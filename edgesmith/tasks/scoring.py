"""Log-likelihoods of continuations through a decoder session: what task accuracy is made of.

A multiple-choice task asks, for each choice, ``log p(continuation | context)`` and whether the
continuation is the greedy one. :class:`SessionScorer` answers such requests through a
:class:`~edgesmith.runtimes.decoder.DecoderSession`, the same session KL divergence and generation
use, so task accuracy, KL and top-1 come from one forward path per artifact (PyTorch, ONNX Runtime,
llama.cpp on the GGUF as it is):

- requests are grouped by context; a context is run once for all its choices;
- when every choice of a context is one token (MMLU's " A"/" B"/" C"/" D"), the context's last
  logits score them all; such contexts run batched (left padding, ``batch_size`` rows per call);
- longer choices reuse the context's KV cache: one ``prefill`` of the context, then per choice one
  ``extend`` with the choice's tokens but its last and a ``rollback`` to the context;
- at ``batch_size`` 1 (always on llama.cpp, whose session holds one sequence) contexts run in
  token order and each keeps the cache of the prefix it shares with the previous one (a task's
  fixed preamble, a subject's description): ``rollback`` to the shared prefix, ``extend`` the rest;
- a sequence longer than the model's context keeps its last ``max_length`` tokens (as lm-eval's
  Hugging Face backend does).

Log-softmax runs in float64 over the whole vocabulary, so identical logits give identical scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgesmith.errors import BadInput
from edgesmith.runtimes.decoder import DecoderSession

log = logging.getLogger(__name__)

#: sequences scored at most this long when the model does not say (lm-eval's default too)
DEFAULT_MAX_LENGTH = 2048
#: contexts run together when all their choices are single tokens
DEFAULT_BATCH_SIZE = 8


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Score:
    """``log p(continuation | context)`` (nats) and whether every continuation token was the argmax."""

    logprob: float
    greedy: bool


def _score(rows: np.ndarray, tokens: Sequence[int]) -> Score:
    """``rows[i]`` are the logits that predict ``tokens[i]``."""
    lp = log_softmax(rows)
    picked = lp[np.arange(len(tokens)), np.asarray(tokens, dtype=np.int64)]
    return Score(float(picked.sum()), bool((lp.argmax(axis=-1) == np.asarray(tokens)).all()))


class SessionScorer:
    """Scores ``(context ids, continuation ids)`` requests on a decoder session."""

    def __init__(self, session: DecoderSession, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, pad_id: int | None = None):
        if batch_size < 1:
            raise BadInput(f"batch_size must be at least 1 (got {batch_size})")
        self.session = session
        # a session that holds fewer sequences (llama.cpp's: one) scores that many at a time
        self.batch_size = min(int(batch_size), session.MAX_BATCH or int(batch_size))
        limit = session.max_positions or DEFAULT_MAX_LENGTH
        self.max_length = int(min(max_length or limit, limit))
        self.pad_id = int(pad_id if pad_id is not None else (session.pad_token_id or 0))
        self.forward_calls = 0

    # -- requests -------------------------------------------------------------------------
    def _fit(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The request as scored: at most ``max_length`` input tokens (context cut on the left)."""
        context, continuation = tuple(int(t) for t in context), tuple(int(t) for t in continuation)
        if not continuation:
            raise BadInput("a continuation with no tokens cannot be scored")
        if not context:
            raise BadInput("a request needs at least one context token (the BOS or EOS token for an empty context)")
        if len(continuation) > self.max_length:
            raise BadInput(f"a continuation of {len(continuation)} tokens is longer than the {self.max_length} "
                           "the model scores at once")
        room = self.max_length + 1 - len(continuation)
        return context[-room:], continuation

    def loglikelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                       progress: Callable[[int], None] | None = None) -> list[Score]:
        """One :class:`Score` per ``(context, continuation)`` request, in order."""
        fitted = [self._fit(c, k) for c, k in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(fitted):
            groups.setdefault(context, []).append(i)
        if self.batch_size == 1:
            return self._sequential(fitted, groups, progress)
        single = [c for c, idx in groups.items() if all(len(fitted[i][1]) == 1 for i in idx)]
        multi = [c for c in groups if c not in set(single)]
        out: list[Score | None] = [None] * len(fitted)
        single.sort(key=len)
        for start in range(0, len(single), self.batch_size):
            chunk = single[start:start + self.batch_size]
            last = self._last_logits(chunk)
            for row, context in enumerate(chunk):
                for i in groups[context]:
                    out[i] = _score(last[row:row + 1], fitted[i][1])
            if progress:
                progress(sum(len(groups[c]) for c in chunk))
        for context in multi:
            for i, score in zip(groups[context], self._with_cache(context, [fitted[i][1] for i in groups[context]])):
                out[i] = score
            if progress:
                progress(len(groups[context]))
        return out  # type: ignore[return-value]

    def _last_logits(self, contexts: Sequence[tuple[int, ...]]) -> np.ndarray:
        """The last position's logits of each context [batch, vocab] (one left-padded prefill)."""
        width = max(len(c) for c in contexts)
        ids = np.full((len(contexts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(contexts), width), dtype=np.int64)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = context
            mask[row, width - len(context):] = 1
        self.forward_calls += 1
        logits = self.session.prefill(ids, mask)
        self.session.reset()
        return logits

    def _with_cache(self, context: tuple[int, ...], continuations: Sequence[tuple[int, ...]]) -> list[Score]:
        """Score several continuations of one context: one prefill, then extend + rollback per choice."""
        session = self.session
        first = session.prefill(np.asarray([context], dtype=np.int64))[0]
        self.forward_calls += 1
        length = session.past_length
        scores = []
        try:
            for cont in continuations:
                if len(cont) == 1:
                    scores.append(_score(first[None, :], cont))
                    continue
                rest = session.extend(np.asarray([cont[:-1]], dtype=np.int64), keep=len(cont) - 1)[0]
                self.forward_calls += 1
                scores.append(_score(np.concatenate([first[None, :], rest], axis=0), cont))
                session.rollback(length)
        finally:
            session.reset()
        return scores

    def _sequential(self, fitted: list[tuple[tuple[int, ...], tuple[int, ...]]], groups: dict[tuple[int, ...], list[int]],
                    progress: Callable[[int], None] | None) -> list[Score]:
        """One context at a time in token order, keeping the cached prefix shared with the previous one."""
        session = self.session
        out: list[Score | None] = [None] * len(fitted)
        cached: tuple[int, ...] = ()
        try:
            for context in sorted(groups):
                shared = 0
                for a, b in zip(cached, context):
                    if a != b:
                        break
                    shared += 1
                shared = min(shared, len(context) - 1)  # at least one token runs: its logits are needed
                if shared == 0:
                    last = session.prefill(np.asarray([context], dtype=np.int64))[0]
                else:
                    if shared < session.past_length:
                        session.rollback(shared)
                    last = session.extend(np.asarray([context[shared:]], dtype=np.int64), keep=1)[0, -1]
                self.forward_calls += 1
                cached = context
                for i in groups[context]:
                    cont = fitted[i][1]
                    if len(cont) == 1:
                        out[i] = _score(last[None, :], cont)
                        continue
                    rest = session.extend(np.asarray([cont[:-1]], dtype=np.int64), keep=len(cont) - 1)[0]
                    self.forward_calls += 1
                    out[i] = _score(np.concatenate([last[None, :], rest], axis=0), cont)
                    session.rollback(len(context))
                if progress:
                    progress(len(groups[context]))
        finally:
            session.reset()
        return out  # type: ignore[return-value]
