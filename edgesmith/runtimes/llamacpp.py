"""llama.cpp as a runtime: a GGUF file run through llama-cpp-python's low-level API.

Install with ``pip install edgesmith[llamacpp]`` (llama-cpp-python compiles llama.cpp at install;
nothing here imports it until a session or tokenizer is made, so the rest of edgesmith works
without it).

- :func:`load_gguf_file` makes a GGUF file an artifact (:class:`~edgesmith.artifacts.GgufModel`)
  without dequantizing it: what ``edgesmith profile model.gguf --runtime llamacpp`` profiles. ``edgesmith.load`` of a ``.gguf``
  gives a :class:`~edgesmith.artifacts.TorchModel` (the weights dequantized to FP32); the session
  takes that too and runs its source file (``meta["gguf"]["path"]``).
- :class:`LlamaCppDecoderSession` is a :class:`~edgesmith.runtimes.decoder.DecoderSession`: one
  ``llama_context`` whose KV cache holds one sequence (batch 1; a larger batch is one line, exit 2),
  ``prefill``/``step`` decode with the logits flag on the last token only (the LM head runs once
  per call, as in llama.cpp's own tools), ``logits`` flags every position. Logits come back as
  float32 [batch, positions, vocab], copied out of llama.cpp's buffer. Prompts longer than
  ``n_batch`` are decoded in chunks of ``n_batch``. ``extend`` and ``rollback`` (speculative
  decoding) work too: llama.cpp removes cached positions in place.
- :class:`GgufTokenizer` is llama.cpp's own tokenizer of the file (a vocab-only load, no
  weights), callable like a Hugging Face tokenizer for the profile's prompts; on the packaged
  SmolLM2 it gives the same ids as the Hugging Face tokenizer of the dequantized model (tested).

The KV cache is allocated for ``n_ctx`` positions when the session is made (llama.cpp does not
grow it, and pads ``n_ctx`` up to a multiple of 256); ``max_positions`` is the padded size llama.cpp
reports. Default ``n_ctx``: the model's training context capped
at :data:`DEFAULT_N_CTX`; a generation profile asks for what its prompts and new tokens need, so
the peak RSS it reports is not inflated by cache it never uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, GgufModel
from edgesmith.artifacts import gguf as gguf_artifacts
from edgesmith.artifacts.gguf import check_gguf_file
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime
from edgesmith.runtimes.decoder import DecoderSession, check_context
from edgesmith.runtimes.llamacpp_library import (
    NAME,
    GgufTokenizer,
    _load_model,
    _model_desc,
    _usable_cores,
    build_info,
    import_llama_cpp,
    training_context,
)

log = logging.getLogger(__name__)

#: the KV cache's positions when none is asked for (capped by the model's training context)
DEFAULT_N_CTX = 4096
#: tokens per llama_decode call (llama.cpp's default n_batch / n_ubatch)
DEFAULT_N_BATCH = 512

# ---------------------------------------------------------------------------------------------
# GGUF files as artifacts
# ---------------------------------------------------------------------------------------------


def load_gguf_file(model: str | Path) -> GgufModel:
    """:func:`edgesmith.artifacts.gguf.load_gguf_file` for this runtime: a GGUF run as it is, tokenized
    by llama.cpp's own reading of the file (:class:`GgufTokenizer`) when no Hugging Face tokenizer
    sits beside it."""
    return gguf_artifacts.load_gguf_file(model, needed_by=f"runtime '{NAME}'", own_tokenizer=GgufTokenizer)


def gguf_path(artifact: Artifact) -> Path:
    """The GGUF file an artifact runs from on llama.cpp (:func:`edgesmith.artifacts.gguf.gguf_path`)."""
    return gguf_artifacts.gguf_path(artifact, needed_by=f"runtime '{NAME}'")


# ---------------------------------------------------------------------------------------------
# llama.cpp handles
# The decoder session
# ---------------------------------------------------------------------------------------------


class LlamaCppDecoderSession(DecoderSession):
    """A GGUF decoder in llama.cpp, one sequence (batch 1) in its KV cache.

    ``threads`` sets llama.cpp's threads for decode and for prompt batches (default: every core
    this process may use); ``n_ctx`` the KV cache's positions; ``n_batch`` tokens per decode call;
    ``flash_attn`` llama.cpp's flash attention (off, llama.cpp's CPU default)."""

    runtime = NAME
    OPTIONS = ("n_ctx", "n_batch", "flash_attn")
    MAX_BATCH = 1  # one sequence in the KV cache

    def __init__(self, model: Artifact | str | Path, *, threads: int | None = None, n_ctx: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, flash_attn: bool = False):
        super().__init__()
        path = check_gguf_file(Path(model)) if isinstance(model, str | Path) else gguf_path(model)
        llama_cpp = import_llama_cpp()
        self._llama = llama_cpp
        self.path = path
        if threads is not None and threads < 1:
            raise BadInput(f"threads must be at least 1 (got {threads})")
        if n_batch < 1:
            raise BadInput(f"n_batch must be at least 1 (got {n_batch})")
        threads = int(threads or _usable_cores())
        self._model = _load_model(llama_cpp, path)
        self._ctx = None
        self._batch = None
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
            if n_ctx is None:
                n_ctx = min(self.n_ctx_train, DEFAULT_N_CTX) if self.n_ctx_train > 0 else DEFAULT_N_CTX
            if n_ctx < 1:
                raise BadInput(f"n_ctx must be at least 1 (got {n_ctx})")
            if self.n_ctx_train > 0 and n_ctx > self.n_ctx_train:
                raise BadInput(f"{path}: n_ctx {n_ctx} exceeds the model's training context of {self.n_ctx_train}; "
                               f"give at most {self.n_ctx_train}")
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = int(n_ctx)
            params.n_batch = params.n_ubatch = int(min(n_batch, n_ctx))
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = threads
            params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            self._ctx = llama_cpp.llama_init_from_model(self._model, params)
            if not self._ctx:
                raise BadInput(f"{path}: llama.cpp could not make a context of {n_ctx} positions (out of memory?); "
                               "give a smaller n_ctx")
            self._memory = llama_cpp.llama_get_memory(self._ctx)
            self.n_batch = int(params.n_batch)
            self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        except BaseException:
            self.close()
            raise
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.num_layers = int(llama_cpp.llama_model_n_layer(self._model))
        self.max_positions = int(llama_cpp.llama_n_ctx(self._ctx))  # n_ctx padded up to a multiple of 256
        if self.n_ctx_train > 0:
            self.max_positions = min(self.max_positions, self.n_ctx_train)
        null = llama_cpp.LLAMA_TOKEN_NULL
        eos = [int(llama_cpp.llama_vocab_eos(self._vocab)), int(llama_cpp.llama_vocab_eot(self._vocab))]
        self.eos_token_ids = sorted({t for t in eos if t != null})
        pad = int(llama_cpp.llama_vocab_pad(self._vocab))
        self.pad_token_id = None if pad == null else pad
        self.device = "cpu"
        self.providers = ["llama.cpp-cpu"]
        info = build_info()
        self.options = {"threads": threads, "n_ctx": self.max_positions, "n_ctx_train": self.n_ctx_train,
                        "n_batch": self.n_batch, "flash_attn": bool(flash_attn), "kv_cache": "llama.cpp",
                        "model": _model_desc(llama_cpp, self._model),
                        "version": info["llama_cpp_python"], "build": info["system_info"]}
        self._tokens: list[int] = []

    # -- decoding ------------------------------------------------------------------------------

    def _decode(self, tokens: list[int], *, all_logits: bool) -> np.ndarray:
        """Append ``tokens`` to the cached sequence; every position's logits ([n, vocab]) when
        ``all_logits``, else the last one's ([1, vocab])."""
        llama_cpp, batch = self._llama, self._batch
        start = len(self._tokens)
        if start + len(tokens) > self.max_positions:
            raise BadInput(f"{start + len(tokens)} tokens exceed the llama.cpp context of {self.max_positions} "
                           f"positions; shorten the prompt or give a larger n_ctx (at most {self.n_ctx_train})")
        outs = []
        for off in range(0, len(tokens), self.n_batch):
            chunk = tokens[off:off + self.n_batch]
            last_chunk = off + self.n_batch >= len(tokens)
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + off + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                self._tokens = self._tokens[:start]
                llama_cpp.llama_memory_seq_rm(self._memory, 0, start, -1)
                if rc == 1:
                    raise BadInput(f"llama.cpp found no room in its KV cache for {len(chunk)} more tokens after "
                                   f"{start + off}; give a larger n_ctx")
                raise RuntimeError(f"llama_decode returned {rc} at position {start + off}")
            if all_logits:
                ptr = llama_cpp.llama_get_logits(self._ctx)
                outs.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.vocab_size)).copy())
        self._tokens = self._tokens + list(tokens)
        if all_logits:
            return np.concatenate(outs, axis=0)
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(1, self.vocab_size)).copy()

    def _clear(self) -> None:
        self._llama.llama_memory_clear(self._memory, True)
        self._tokens = []

    @staticmethod
    def _one_row(ids: np.ndarray, mask: np.ndarray) -> list[int]:
        if ids.shape[0] != 1:
            raise BadInput(f"the llama.cpp runtime runs one sequence at a time (batch 1); got a batch of "
                           f"{ids.shape[0]}: give one prompt per call or profile with --batch 1")
        return [int(t) for t in ids[0][mask[0] > 0]]

    def _forward(self, ids, mask, positions, *, start, keep):
        if start:
            self._clear()
            tokens = self._one_row(ids, mask)
        else:
            tokens = [int(t) for t in ids.reshape(-1)]
        if keep == 1:
            return self._decode(tokens, all_logits=False)[None, :, :]
        return self._decode(tokens, all_logits=True)[None, -keep:, :]

    def _full(self, ids, mask, positions):
        """Every position's logits of one sequence (padding positions left at 0). The cache holds
        one sequence: a sequence in progress is decoded again afterwards, so it continues as before."""
        tokens = self._one_row(ids, mask)
        kept = list(self._tokens)
        self._clear()
        try:
            logits = self._decode(tokens, all_logits=True)
        finally:
            self._clear()
            if kept:
                self._decode(kept, all_logits=False)
        out = np.zeros((1, ids.shape[1], self.vocab_size), dtype=np.float32)
        out[0, mask[0] > 0] = logits
        return out

    def _truncate(self, length: int) -> None:
        """Keep the sequence's first ``length`` positions (``rollback``): llama.cpp drops the rest
        of its KV cache in place (``llama_memory_seq_rm``)."""
        padding = self.past_length - len(self._tokens)  # a padded prompt's padding was never decoded
        keep = max(0, int(length) - padding)
        self._llama.llama_memory_seq_rm(self._memory, 0, keep, -1)
        self._tokens = self._tokens[:keep]

    def reset(self) -> None:
        super().reset()
        if getattr(self, "_ctx", None):
            self._clear()

    def close(self) -> None:
        llama_cpp = self._llama
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None
        super().reset()
        self._tokens = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


# ---------------------------------------------------------------------------------------------
# The registered runtime
# ---------------------------------------------------------------------------------------------


class LlamaCppRuntime(Runtime):
    """llama.cpp through llama-cpp-python: runs GGUF decoders (generation sessions), a GGUF file as
    it is whatever artifact carries it (a model read from a GGUF runs its original file)."""

    name = "llamacpp"
    kinds = ("gguf",)
    decoder_kinds = ("gguf",)
    decoder_session = LlamaCppDecoderSession
    decoder_hint = "export it to GGUF first (edgesmith export MODEL --to gguf)"
    remote_generation = True

    def availability(self) -> Availability:
        try:
            info = build_info()
        except BadInput as exc:
            return Availability(False, str(exc))
        return Availability(True, version=info["llama_cpp_python"], devices=["cpu"])

    def accepts(self, artifact: Artifact) -> bool:
        try:
            gguf_path(artifact)
        except BadInput:
            return False
        return True

    def check(self, artifact: Artifact) -> None:
        gguf_path(artifact)
        avail = self.availability()
        if not avail.usable:
            raise BadInput(avail.reason)

    def load_artifact(self, source: str | Path) -> GgufModel:
        """The GGUF file as it is, never dequantized into a torch model."""
        return load_gguf_file(source)

    def check_decoder(self, artifact: Artifact) -> None:
        gguf_path(artifact)  # one line when the artifact has no GGUF file

    def decoder_location(self, artifact: Artifact) -> Path:
        return gguf_path(artifact)

    def load_decoder_at(self, path: Path, *, threads: int | None = None, **options: Any) -> LlamaCppDecoderSession:
        """The session on the GGUF file itself: the profiling worker's llama.cpp side imports no torch."""
        self.check_decoder_options(options)
        return LlamaCppDecoderSession(Path(path), threads=threads, **options)

    def generation_options(self, artifact: Artifact, prompt_tokens: list[int], new_tokens: int,
                           options: dict[str, Any]) -> dict[str, Any]:
        """llama.cpp allocates its KV cache for ``n_ctx`` positions up front: unless asked otherwise,
        just what the prompts and new tokens need (so peak RSS holds no unused cache), after checking
        they fit the model's training context (read from the GGUF's vocab-only load)."""
        check_context(prompt_tokens, new_tokens, training_context(gguf_path(artifact)), artifact.name)
        needed = max(max(prompt_tokens), prompt_tokens[0] + new_tokens - 1)
        return {"n_ctx": needed, **options}

    def load(self, artifact: Artifact, **options: Any) -> LlamaCppDecoderSession:
        self.check(artifact)
        return self.load_decoder(artifact, **options)
