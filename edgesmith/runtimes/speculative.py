"""Greedy speculative decoding on a decoder session (batch 1): a draft proposes a few tokens, the
target verifies them all in one run, and its output stays the target's plain greedy output.

One round: the target's cache holds every token but the last one chosen (``seq[-1]``). A drafter
proposes up to ``k`` tokens after ``seq``; the target runs ``[seq[-1], d1 .. dk]`` in one call
(:meth:`~edgesmith.runtimes.decoder.DecoderSession.extend`, the last ``k + 1`` positions' logits)
and its argmax at each position says what plain greedy decoding would have chosen there. The
longest prefix of the draft that agrees is accepted, plus the target's own token after it (so a
round always yields at least one token, and ``k + 1`` when everything agrees); the target's cache
is rolled back past the rejected tokens (:meth:`~edgesmith.runtimes.decoder.DecoderSession.rollback`).

Drafters:

- :class:`ModelDrafter`: a smaller decoder session with the target's vocabulary (a depth-pruned
  or distilled copy). It keeps its own cache in step with the accepted tokens: each proposal rolls
  it back to the prefix it shares with the sequence, feeds what is new in one run, then steps.
- :class:`PromptLookupDrafter`: n-gram prompt lookup (no model): the last ``n`` tokens (``n`` from
  ``max_ngram`` down to 1) are searched for in the earlier prompt and output, and the tokens that
  followed their latest occurrence with ``k`` tokens after it are proposed. It costs microseconds and pays where the output
  copies the input (summaries, extraction, code edits).

Identity with plain greedy: the target scores ``k + 1`` positions in one run where plain decoding
scores one; the floating-point sums differ in the last bits, so a near-tie between the two most
likely tokens could in principle flip. The measured profile (:mod:`edgesmith.profiling.speculative`)
therefore compares the two outputs token for token on every prompt instead of assuming equality.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesmith.errors import BadInput
from edgesmith.runtimes.decoder import DecoderSession
from edgesmith.runtimes.generation import (
    GenerationConfig,
    GenerationResult,
    Messages,
    TextStream,
    load_decoder,
    prompt_ids,
    stop_ids_for,
)

log = logging.getLogger(__name__)

DEFAULT_NUM_TOKENS = 4
DEFAULT_MAX_NGRAM = 3


# ---------------------------------------------------------------------------------------------
# Drafters
# ---------------------------------------------------------------------------------------------


class Drafter(ABC):
    """Proposes tokens that may follow a sequence; the target decides which to keep."""

    name: str = "draft"

    @abstractmethod
    def propose(self, seq: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that may follow ``seq`` (prompt and output so far); may be fewer or none."""

    def reset(self) -> None:
        """Forget the previous sequence (a new prompt follows)."""

    def close(self) -> None:
        self.reset()


class PromptLookupDrafter(Drafter):
    """n-gram prompt lookup: the continuation of the latest earlier occurrence of the sequence's
    last ``n`` tokens (the latest with ``k`` tokens after it), the longest ``n`` up to ``max_ngram``
    that occurs first."""

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM):
        if max_ngram < 1:
            raise BadInput(f"prompt lookup needs an n-gram of at least 1 token, got {max_ngram}")
        self.max_ngram = int(max_ngram)
        self.name = f"prompt-lookup-{self.max_ngram}"

    def propose(self, seq: Sequence[int], k: int) -> list[int]:
        if k < 1 or len(seq) < 2:
            return []
        arr = np.asarray(seq, dtype=np.int64)
        total = arr.size
        for n in range(min(self.max_ngram, total - 1), 0, -1):
            tail = arr[total - n:]
            # windows starting at 0 .. total - n - 1 (the tail itself excluded), latest first
            windows = np.lib.stride_tricks.sliding_window_view(arr[:total - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            best: np.ndarray | None = None
            for start in hits[::-1]:  # the latest occurrence with k tokens after it, else the longest
                follow = arr[start + n:start + n + k]
                if best is None or follow.size > best.size:
                    best = follow
                if follow.size == k:
                    break
            if best is not None and best.size:
                return [int(t) for t in best]
        return []


class ModelDrafter(Drafter):
    """A draft decoder session whose cache follows the accepted sequence."""

    def __init__(self, session: DecoderSession, name: str = "draft-model"):
        self.session = session
        self.name = name
        self._cached: list[int] = []  # the tokens in the draft's cache, in order

    def propose(self, seq: Sequence[int], k: int) -> list[int]:
        if k < 1:
            return []
        seq = [int(t) for t in seq]
        common = 0
        limit = min(len(self._cached), len(seq) - 1)  # feed at least the last token
        while common < limit and self._cached[common] == seq[common]:
            common += 1
        s = self.session
        if s.max_positions and len(seq) + k - 1 > int(s.max_positions):
            k = int(s.max_positions) - len(seq) + 1
            if k < 1:
                return []
        if common == 0:
            logits = s.prefill(np.asarray([seq], dtype=np.int64))
        else:
            s.rollback(common)
            logits = s.extend(np.asarray([seq[common:]], dtype=np.int64), keep=1)[:, -1]
        out = [int(logits[0].argmax())]
        for _ in range(k - 1):
            out.append(int(s.step(np.asarray([out[-1]], dtype=np.int64))[0].argmax()))
        self._cached = seq + out[:-1]
        return out

    def reset(self) -> None:
        self.session.reset()
        self._cached = []

    def close(self) -> None:
        self.reset()
        self.session.close()


# ---------------------------------------------------------------------------------------------
# Vocabulary check
# ---------------------------------------------------------------------------------------------


def check_vocabulary(target: DecoderSession, draft: DecoderSession, target_tokenizer=None, draft_tokenizer=None,
                     *, draft_name: str = "the draft") -> None:
    """The draft must score the target's tokens: the same vocabulary size and, where both have a
    tokenizer, the same token-to-id map. Else one line (exit 2) before anything runs."""
    if target.vocab_size and draft.vocab_size and target.vocab_size != draft.vocab_size:
        raise BadInput(f"{draft_name} has a vocabulary of {draft.vocab_size} tokens and the target {target.vocab_size}; "
                       "a draft must share the target's tokenizer (draft with a pruned or distilled copy of the target)")
    if target_tokenizer is not None and draft_tokenizer is not None:
        mine, theirs = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if mine != theirs:
            differ = len(set(mine.items()) ^ set(theirs.items()))
            raise BadInput(f"{draft_name}'s tokenizer maps {differ} token(s) differently from the target's; a draft "
                           "must share the target's tokenizer (draft with a pruned or distilled copy of the target)")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class SpeculativeRun:
    """One prompt's speculative decode: the tokens (stop token included), TTFT (the target's
    prefill and first choice), the decode time after it, per-token latencies (each round's time
    shared by the tokens it yielded), and the counters."""

    tokens: list[int]
    finish_reason: str
    ttft_ms: float
    decode_ms: float
    latencies_ms: list[float]
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    accepted_per_call: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_call(self) -> float | None:
        """Tokens after the first per target call (1.0 is plain decoding)."""
        return (len(self.tokens) - 1) / self.target_calls if self.target_calls else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        return (len(self.tokens) - 1) / (self.decode_ms / 1000.0) if self.decode_ms > 0 else None


def speculative_loop(target: DecoderSession, drafter: Drafter, prompt: Sequence[int], *, max_new_tokens: int,
                     num_tokens: int = DEFAULT_NUM_TOKENS, stop_ids: Sequence[int] = (), ignore_eos: bool = False,
                     on_token: Callable[[int], bool] | None = None) -> SpeculativeRun:
    """Greedy speculative decoding of one prompt (token ids). ``on_token(token)`` sees each new
    token in order and may return True to stop (stop strings). The target's cache is left at the end
    of the accepted sequence; the drafter is reset first."""
    if num_tokens < 1:
        raise BadInput(f"num_tokens (tokens drafted per round) must be at least 1, got {num_tokens}")
    if max_new_tokens < 1:
        raise BadInput(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise BadInput("an empty prompt: speculative decoding needs at least one prompt token")
    stops = set() if ignore_eos else {int(s) for s in stop_ids}
    drafter.reset()
    t0 = time.perf_counter()
    logits = target.prefill(np.asarray([prompt], dtype=np.int64))
    first = int(logits[0].argmax())
    ttft = (time.perf_counter() - t0) * 1000.0
    run = SpeculativeRun(tokens=[first], finish_reason="length", ttft_ms=ttft, decode_ms=0.0, latencies_ms=[])
    seq = prompt + [first]
    if first in stops:
        run.finish_reason = "stop_token"
        return run
    if on_token is not None and on_token(first):
        run.finish_reason = "stop_string"
        return run
    context = int(target.max_positions or 0)
    started = time.perf_counter()
    while len(run.tokens) < max_new_tokens:
        round_start = time.perf_counter()
        k = min(num_tokens, max_new_tokens - len(run.tokens) - 1)
        if context:
            k = min(k, context - len(seq))
        draft = drafter.propose(seq, k) if k > 0 else []
        draft = draft[:max(k, 0)]
        t_verify = time.perf_counter()
        run.draft_ms += (t_verify - round_start) * 1000.0
        verify = target.extend(np.asarray([[seq[-1], *draft]], dtype=np.int64), keep=len(draft) + 1)[0]
        choices = verify.argmax(axis=-1)
        accepted = 0
        while accepted < len(draft) and draft[accepted] == int(choices[accepted]):
            accepted += 1
        if accepted < len(draft):
            target.rollback(target.past_length - (len(draft) - accepted))
        run.verify_ms += (time.perf_counter() - t_verify) * 1000.0
        run.target_calls += 1
        run.drafted += len(draft)
        run.accepted += accepted
        run.accepted_per_call.append(accepted)
        new = [*draft[:accepted], int(choices[accepted])]
        share = (time.perf_counter() - round_start) * 1000.0 / len(new)
        for token in new:
            run.tokens.append(token)
            run.latencies_ms.append(share)
            seq.append(token)
            if token in stops:
                run.finish_reason = "stop_token"
                break
            if on_token is not None and on_token(token):
                run.finish_reason = "stop_string"
                break
        if run.finish_reason != "length":
            break
    run.decode_ms = (time.perf_counter() - started) * 1000.0
    return run


def speculative_generate(target: DecoderSession, tokenizer, prompt: str | Messages, drafter: Drafter,
                         cfg: GenerationConfig | None = None, *, num_tokens: int = DEFAULT_NUM_TOKENS,
                         on_token: Callable[[str], None] | None = None) -> tuple[GenerationResult, SpeculativeRun]:
    """:func:`~edgesmith.runtimes.generation.generate` with a drafter: the same greedy text, with
    the run's counters. Greedy only (speculation that keeps sampled output's distribution is not
    built here)."""
    cfg = cfg or GenerationConfig()
    if not cfg.greedy:
        raise BadInput("speculative decoding here is greedy only; drop --temperature/--top-k/--top-p "
                       "(or the draft) to sample")
    ids = prompt_ids(tokenizer, prompt, chat=cfg.chat)
    if not ids:
        raise BadInput("a prompt encodes to no tokens; give some text")
    max_new = cfg.max_new_tokens
    if target.max_positions and len(ids) >= target.max_positions:
        raise BadInput(f"the prompt has {len(ids)} tokens and the model's context is {target.max_positions}; "
                       "shorten the prompt")
    if target.max_positions:
        max_new = min(max_new, int(target.max_positions) - len(ids))
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    stream = TextStream(tokenizer, [] if cfg.ignore_eos else cfg.stop_strings, skip_ids=special)

    def push(token: int) -> bool:
        piece = stream.push(token)
        if piece and on_token is not None:
            on_token(piece)
        return stream.stopped

    run = speculative_loop(target, drafter, ids, max_new_tokens=max_new, num_tokens=num_tokens,
                           stop_ids=stop_ids_for(target, tokenizer, cfg), ignore_eos=cfg.ignore_eos, on_token=push)
    tail = stream.finish()
    if tail and on_token is not None:
        on_token(tail)
    result = GenerationResult(text=stream.text, token_ids=list(run.tokens), prompt_tokens=len(ids),
                              ttft_ms=run.ttft_ms, latencies_ms=list(run.latencies_ms),
                              finish_reason=run.finish_reason, providers=list(target.providers))
    return result, run


def make_drafter(target: DecoderSession, *, draft: Any = None, prompt_lookup: int | None = None,
                 target_tokenizer=None, threads: int | None = None) -> Drafter:
    """A drafter from what the user named: ``draft`` (an artifact, or anything ``edgesmith.load``
    takes) or ``prompt_lookup`` (the longest n-gram); exactly one. The draft's vocabulary is checked
    against the target's before anything runs."""
    from edgesmith.artifacts import load

    if (draft is None) == (prompt_lookup is None):
        raise BadInput("give exactly one draft: a draft model (--draft FOLDER) or n-gram prompt lookup "
                       "(--prompt-lookup N)")
    if prompt_lookup is not None:
        return PromptLookupDrafter(prompt_lookup)
    artifact = load(str(draft)) if not hasattr(draft, "kind") else draft
    session = load_decoder(artifact, threads=threads)
    try:
        check_vocabulary(target, session, target_tokenizer, getattr(artifact, "tokenizer", None),
                         draft_name=f"draft {artifact.name}")
    except BadInput:
        session.close()
        raise
    return ModelDrafter(session, name=str(artifact.name))
