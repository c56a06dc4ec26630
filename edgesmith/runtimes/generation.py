"""Text generation on a decoder session (:mod:`edgesmith.runtimes.decoder`): sampling (greedy,
temperature, top-k, top-p), the batched decode loop with left padding, stop tokens and strings,
streamed text, and the chat template for instruct models.

:func:`generate` applies the chat template (instruct models), streams text through a callback
(decoded incrementally, so a character split over several byte-level tokens is printed once it is
whole) and stops on stop tokens or stop strings; :func:`decode_loop` is the batched loop beneath it.
:func:`generate_text` is the one-call form behind ``es.generate`` and ``edgesmith generate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, load
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Runtime, default_runtime_for, get_runtime
from edgesmith.runtimes.decoder import DecoderSession

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop.

    ``temperature`` 0 is greedy (argmax). ``top_k`` 0 and ``top_p`` 1 switch those filters off.
    ``stop_token_ids`` None means the model's EOS ids. ``ignore_eos`` generates exactly
    ``max_new_tokens`` tokens (stop tokens and stop strings ignored), for forced-length benchmarks.
    ``chat`` None applies the tokenizer's chat template when it has one.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    chat: bool | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise BadInput(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise BadInput(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise BadInput(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"top_p must lie in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise BadInput("an empty stop string would stop at once; remove it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def choose_next(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row of ``logits`` ([batch, vocab]): argmax when greedy, else a draw
    from the softmax at ``temperature`` restricted to the ``top_k`` most likely tokens and then to
    the smallest set whose probability reaches ``top_p`` (the most likely token always stays).
    Draws come from ``rng``, so a seeded generator reproduces them."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise BadInput(f"choose_next expects logits [batch, vocab], got shape {logits.shape}")
    if cfg.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    scores = logits.astype(np.float64) / cfg.temperature
    vocab = scores.shape[-1]
    order = np.argsort(-scores, axis=-1, kind="stable")
    if 0 < cfg.top_k < vocab:
        order = order[:, :cfg.top_k]
    ranked = np.take_along_axis(scores, order, axis=-1)
    probs = np.exp(ranked - ranked[:, :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        before = np.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        probs = np.where(before < cfg.top_p, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(probs, axis=-1)
    draws = rng.random(len(cdf)) * cdf[:, -1]
    picks = np.minimum((cdf < draws[:, None]).sum(axis=-1), cdf.shape[1] - 1)
    return order[np.arange(len(order)), picks].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The generation loop
# ---------------------------------------------------------------------------------------------


@dataclass
class DecodeRun:
    """What :func:`decode_loop` returns: tokens [batch, n] (rows after their stop hold ``pad``),
    each row's length (stop token included), why each row ended, TTFT and per-step latencies."""

    tokens: np.ndarray
    lengths: list[int]
    finish_reasons: list[str]
    ttft_ms: float
    latencies_ms: list[float]


def decode_loop(session: DecoderSession, input_ids: np.ndarray, attention_mask: np.ndarray | None,
                cfg: GenerationConfig, *, stop_ids: Sequence[int] = (), pad_id: int = 0,
                on_step: Callable[[int, np.ndarray], Sequence[bool] | None] | None = None) -> DecodeRun:
    """Prefill a (left-padded) batch, then one token per step until every row stopped or
    ``max_new_tokens`` were made. ``on_step(step, tokens)`` sees each step's tokens and may return
    per-row flags that stop rows (stop strings). Rows that stopped are fed ``pad_id`` (their output is
    ignored). ``ttft_ms`` is prefill plus the first choice; ``latencies_ms`` one per later token."""
    rng = np.random.default_rng(cfg.seed)
    stops = np.array(sorted(set(int(s) for s in stop_ids)), dtype=np.int64)
    t0 = time.perf_counter()
    logits = session.prefill(input_ids, attention_mask)
    chosen = choose_next(logits, cfg, rng)
    ttft = (time.perf_counter() - t0) * 1000.0
    batch = chosen.shape[0]
    tokens = np.full((batch, cfg.max_new_tokens), pad_id, dtype=np.int64)
    lengths = [0] * batch
    reasons = ["length"] * batch
    done = np.zeros(batch, dtype=bool)
    latencies: list[float] = []
    for step in range(cfg.max_new_tokens):
        if step:
            t0 = time.perf_counter()
            logits = session.step(np.where(done, pad_id, tokens[:, step - 1]))
            chosen = choose_next(logits, cfg, rng)
            latencies.append((time.perf_counter() - t0) * 1000.0)
        live = ~done
        tokens[live, step] = chosen[live]
        for row in np.flatnonzero(live):
            lengths[row] = step + 1
        if not cfg.ignore_eos and stops.size:
            hit = live & np.isin(chosen, stops)
            for row in np.flatnonzero(hit):
                reasons[row] = "stop_token"
            done |= hit
        if on_step is not None:
            flags = on_step(step, np.where(live, chosen, -1))
            if flags is not None and not cfg.ignore_eos:
                flagged = live & ~done & np.asarray(flags, dtype=bool)
                for row in np.flatnonzero(flagged):
                    reasons[row] = "stop_string"
                done |= flagged
        if done.all():
            break
    return DecodeRun(tokens=tokens[:, :max(lengths)], lengths=lengths, finish_reasons=reasons, ttft_ms=ttft,
                     latencies_ms=latencies)


class TextStream:
    """Incremental detokenization of one row, with stop strings held back until they can no longer
    start one. Decodes a short window of tokens (vLLM's prefix/read offsets), so a character split
    across byte-level tokens appears once whole, and SentencePiece's leading spaces stay right."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), skip_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.skip = set(int(i) for i in skip_ids)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a token; return the text that became final (maybe ""). Sets ``stopped`` when a stop
        string completes (the text is then cut before it)."""
        if self.stopped:
            return ""
        if token not in self.skip:
            self.ids.append(int(token))
            before = self._decode(self.ids[self._prefix:self._read])
            after = self._decode(self.ids[self._prefix:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self, final: bool = False) -> str:
        for stop in self.stop_strings:
            at = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        hold = 0
        if not self.stopped and not final:
            for stop in self.stop_strings:  # keep back a tail that may be the start of a stop string
                for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:size]):
                        hold = max(hold, size)
                        break
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def finish(self) -> str:
        """The rest of the text at the end of generation (a held-back tail, an incomplete character)."""
        if not self.stopped:
            whole = self._decode(self.ids[self._prefix:])
            before = self._decode(self.ids[self._prefix:self._read])
            if len(whole) > len(before):
                self.text += whole[len(before):]
                self._prefix = self._read = len(self.ids)
        return self._release(final=True)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    ttft_ms: float
    latencies_ms: list[float]
    finish_reason: str
    providers: list[str]

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decode time (None with fewer than 2 tokens)."""
        total = sum(self.latencies_ms)
        return len(self.latencies_ms) / (total / 1000.0) if total > 0 else None


Messages = Sequence[Mapping[str, str]]


def prompt_ids(tokenizer, prompt: str | Messages, *, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt: through the chat template when the tokenizer has one (or ``chat``
    says so; a list of messages needs one), else the plain text tokenized."""
    if tokenizer is None:
        raise BadInput("this model has no tokenizer to encode the prompt; save one beside the model "
                       "(tokenizer.save_pretrained) or give token ids")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    is_messages = not isinstance(prompt, str)
    if chat and not has_template:
        raise BadInput("the tokenizer has no chat template; drop the chat option or add a template "
                       "(tokenizer.chat_template) to the model folder")
    if is_messages and not has_template:
        raise BadInput("messages need a chat template and this tokenizer has none; give the prompt as plain text")
    if (chat is None and has_template) or chat or is_messages:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids -> (input_ids, attention_mask), padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    return ids, mask


def decode_static_batch(session: DecoderSession, rows: Sequence[Sequence[int]], new_tokens: int,
                        pad_id: int) -> DecodeRun:
    """A static batch of prompts that may differ in length (all arrive together): every row
    generates ``new_tokens`` greedy tokens, EOS ignored. The session's own batched loop where it
    has one (:meth:`~edgesmith.runtimes.decoder.DecoderSession.decode_rows`), else this module's:
    rows left-padded with ``pad_id``, :func:`decode_loop`. Batched generation profiles time this."""
    run = session.decode_rows(rows, new_tokens, pad_id)
    if run is not None:
        return run
    ids, mask = left_pad(rows, pad_id)
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, chat=False)
    return decode_loop(session, ids, mask, cfg, pad_id=pad_id)


def pad_id_of(session: DecoderSession, tokenizer=None) -> int:
    """The id padding is written with: the tokenizer's pad, the session's, else the first EOS (0 when none)."""
    return _pad_id(session, tokenizer)


def _pad_id(session: DecoderSession, tokenizer) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), session.pad_token_id,
                  (session.eos_token_ids or [None])[0], getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def stop_ids_for(session: DecoderSession, tokenizer, cfg: GenerationConfig) -> list[int]:
    if cfg.stop_token_ids is not None:
        return list(cfg.stop_token_ids)
    ids = list(session.eos_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return ids


def generate_batch(session: DecoderSession, tokenizer, prompts: Sequence[str | Messages],
                   cfg: GenerationConfig | None = None, *,
                   on_token: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
    """Generate for several prompts at once (left padding). ``on_token(row, text)`` receives each
    row's new text as it becomes final."""
    cfg = cfg or GenerationConfig()
    if not prompts:
        raise BadInput("no prompt to generate from")
    rows = [prompt_ids(tokenizer, p, chat=cfg.chat) for p in prompts]
    if any(not r for r in rows):
        raise BadInput("a prompt encodes to no tokens; give some text")
    longest = max(len(r) for r in rows)
    if session.max_positions and longest >= session.max_positions:
        raise BadInput(f"the prompt has {longest} tokens and the model's context is {session.max_positions}; "
                       "shorten the prompt")
    if session.max_positions and longest + cfg.max_new_tokens > session.max_positions:
        allowed = session.max_positions - longest
        log.warning("max_new_tokens %d lowered to %d: the context holds %d tokens", cfg.max_new_tokens, allowed,
                    session.max_positions)
        cfg = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": allowed})
    pad = _pad_id(session, tokenizer)
    stop_ids = stop_ids_for(session, tokenizer, cfg)
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    streams = [TextStream(tokenizer, [] if cfg.ignore_eos else cfg.stop_strings, skip_ids=special)
               for _ in rows]

    def on_step(step: int, chosen: np.ndarray) -> list[bool]:
        flags = []
        for row, (stream, token) in enumerate(zip(streams, chosen)):
            if token >= 0:
                piece = stream.push(int(token))
                if piece and on_token is not None:
                    on_token(row, piece)
            flags.append(stream.stopped)
        return flags

    ids, mask = left_pad(rows, pad)
    run = decode_loop(session, ids, mask, cfg, stop_ids=stop_ids, pad_id=pad, on_step=on_step)
    results = []
    for row, stream in enumerate(streams):
        tail = stream.finish()
        if tail and on_token is not None:
            on_token(row, tail)
        results.append(GenerationResult(text=stream.text, token_ids=run.tokens[row, :run.lengths[row]].tolist(),
                                        prompt_tokens=len(rows[row]), ttft_ms=run.ttft_ms,
                                        latencies_ms=run.latencies_ms[:max(run.lengths[row] - 1, 0)],
                                        finish_reason=run.finish_reasons[row], providers=list(session.providers)))
    return results


def generate(session: DecoderSession, tokenizer, prompt: str | Messages, cfg: GenerationConfig | None = None, *,
             on_token: Callable[[str], None] | None = None) -> GenerationResult:
    """Generate from one prompt (text, or chat messages) and stream the text to ``on_token``."""
    callback = None if on_token is None else (lambda _row, text: on_token(text))
    return generate_batch(session, tokenizer, [prompt], cfg, on_token=callback)[0]


def decoder_runtime(artifact: Artifact, runtime: str | None = None) -> Runtime:
    """The runtime that runs ``artifact`` as a decoder: ``runtime``, or the artifact's own (ONNX
    Runtime for an ONNX export, PyTorch for a torch model, llama.cpp for a GGUF file); one line
    naming the fix when it cannot."""
    chosen = get_runtime(runtime or default_runtime_for(artifact))
    chosen.check_decoder(artifact)
    return chosen


def open_decoder(model: Artifact | str | Path, runtime: str | None = None, *, threads: int | None = None,
                 **options: Any) -> tuple[Artifact, DecoderSession]:
    """The artifact and its decoder session: the one place a decoder session is opened. ``model`` is
    an artifact or anything :func:`edgesmith.load` takes, read as ``runtime`` reads it (llama.cpp:
    a ``.gguf`` file as it is; the others: dequantized to FP32). ``options`` are the session's
    declared ``OPTIONS``."""
    if isinstance(model, str | Path):
        artifact = get_runtime(runtime).load_artifact(model) if runtime is not None else load(model)
    else:
        artifact = model
    chosen = decoder_runtime(artifact, runtime)
    return artifact, chosen.load_decoder(artifact, threads=threads, **options)


def load_decoder(artifact: Artifact, *, threads: int | None = None, **options: Any) -> DecoderSession:
    """The decoder session of ``artifact`` on its own runtime (:func:`open_decoder`)."""
    return open_decoder(artifact, threads=threads, **options)[1]


def generate_text(model: Artifact | str, prompt: str | Messages, *, threads: int | None = None,
                  runtime: str | None = None, on_token: Callable[[str], None] | None = None,
                  **options: Any) -> GenerationResult:
    """Load ``model`` (an artifact, or anything :func:`edgesmith.load` takes: ``"smollm2"``, a
    .gguf file, a folder), generate from ``prompt`` and close the session: ``es.generate``.
    ``runtime`` picks the runtime (see :func:`open_decoder`). ``options`` are
    :class:`GenerationConfig` fields (max_new_tokens, temperature, top_k, top_p, seed,
    stop_strings, chat, ...)."""
    artifact, session = open_decoder(model, runtime=runtime, threads=threads)
    try:
        return generate(session, artifact.tokenizer, prompt, GenerationConfig(**options), on_token=on_token)
    finally:
        session.close()
