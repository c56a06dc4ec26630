"""llama.cpp as a runtime: a GGUF file run through llama-cpp-python's low-level API.

Install with ``pip install edgesmith[llamacpp]`` (llama-cpp-python compiles llama.cpp at install;
nothing here imports it until a session or tokenizer is made, so the rest of edgesmith works
without it).

- :func:`load_gguf_file` makes a GGUF file an artifact (:class:`~edgesmith.artifacts.GgufModel`)
  without dequantizing it: what ``edgesmith profile model.gguf --runtime llamacpp`` profiles. ``edgesmith.load`` of a ``.gguf``
  gives a :class:`~edgesmith.artifacts.TorchModel` (the weights dequantized to FP32); the session
  takes that too and runs its source file (``meta["gguf"]["path"]``).
- :class:`LlamaCppDecoderSession` is a :class:`~edgesmith.runtimes.decoder.DecoderSession`: one
  ``llama_context`` whose KV cache holds one sequence per row of a batch (``n_seq_max``, a cache per
  sequence as llama.cpp makes it by default; grown by ``reserve`` or by a larger prefill, up to
  llama.cpp's 256 sequences). A batch is decoded as llama.cpp's own batched tools do it: every
  row's tokens in the same ``llama_decode`` calls, each token tagged with its row's sequence id, a
  row's padding never decoded (each sequence starts at position 0). ``prefill``/``step`` decode with
  the logits flag on each row's last token only (the LM head runs once per row and call, as in
  llama.cpp's own tools), ``logits`` flags every position (one row at a time). Logits come back as
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
    """A GGUF decoder in llama.cpp, a sequence per row in its KV cache.

    ``threads`` sets llama.cpp's threads for decode and for prompt batches (default: every core
    this process may use); ``n_ctx`` the KV cache's positions per sequence; ``n_batch`` tokens per
    decode call (all rows together);
    ``flash_attn`` llama.cpp's flash attention (off, llama.cpp's CPU default)."""

    runtime = NAME
    OPTIONS = ("n_ctx", "n_batch", "flash_attn")
    MAX_BATCH = 256  # sequences in one KV cache (llama.cpp's LLAMA_MAX_SEQ)
    BATCHING = ("edgesmith's loop, each row a llama.cpp sequence of its own (no padding decoded, a KV cache per "
                "sequence), every row's tokens in the same llama_decode calls")

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
            self._flash_attn, self._threads = bool(flash_attn), threads
            self._make_context(int(n_ctx), 1, int(n_batch))
        except BaseException:
            self.close()
            raise
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.num_layers = int(llama_cpp.llama_model_n_layer(self._model))
        null = llama_cpp.LLAMA_TOKEN_NULL
        eos = [int(llama_cpp.llama_vocab_eos(self._vocab)), int(llama_cpp.llama_vocab_eot(self._vocab))]
        self.eos_token_ids = sorted({t for t in eos if t != null})
        pad = int(llama_cpp.llama_vocab_pad(self._vocab))
        self.pad_token_id = None if pad == null else pad
        self.device = "cpu"
        self.providers = ["llama.cpp-cpu"]
        info = build_info()
        self.options = {"threads": threads, "n_ctx": self.max_positions, "n_ctx_train": self.n_ctx_train,
                        "n_batch": self.n_batch, "n_seq_max": self._n_seq, "flash_attn": bool(flash_attn),
                        "kv_cache": "llama.cpp", "model": _model_desc(llama_cpp, self._model),
                        "version": info["llama_cpp_python"], "build": info["system_info"]}
        self._rows: list[list[int]] = []

    def _make_context(self, n_ctx: int, n_seq: int, n_batch: int) -> None:
        """A llama.cpp context whose KV cache holds ``n_seq`` sequences of ``n_ctx`` positions each
        (llama.cpp's default: a cache per sequence, ``kv_unified`` off), and a batch of ``n_batch``
        tokens; the one before it is freed."""
        llama_cpp = self._llama
        self._free_context()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = int(n_ctx) * int(n_seq)
        params.n_batch = params.n_ubatch = int(min(n_batch, params.n_ctx))
        params.n_seq_max = int(n_seq)
        params.n_threads = params.n_threads_batch = self._threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self._flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise BadInput(f"{self.path}: llama.cpp could not make a context of {n_seq} x {n_ctx} positions (out of "
                           "memory?); give a smaller n_ctx or batch")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_batch = int(params.n_batch)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._n_seq = int(llama_cpp.llama_n_seq_max(self._ctx))
        self.max_positions = int(llama_cpp.llama_n_ctx_seq(self._ctx))  # per sequence, padded to a multiple of 256
        if self.n_ctx_train > 0:
            self.max_positions = min(self.max_positions, self.n_ctx_train)
        self._rows = []

    def _free_context(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            self._llama.llama_free(self._ctx)
            self._ctx = None

    def reserve(self, rows: int, positions: int) -> None:
        """Room for ``rows`` sequences of ``positions`` each: a new context (and KV cache) when this
        one holds fewer sequences or positions (at most the model's training context); a new
        context starts empty, so a sequence in progress is dropped with the old one."""
        if self.n_ctx_train > 0 and positions > self.n_ctx_train:
            raise BadInput(f"{positions} tokens exceed the model's context of {self.n_ctx_train}; shorten the prompts "
                           "or lower the new tokens")
        super().reserve(rows, min(positions, self.max_positions))
        if rows > self._n_seq or positions > self.max_positions:
            super().reset()
            self._make_context(max(positions, self.max_positions), max(rows, self._n_seq), self.n_batch)
            self.options.update(n_ctx=self.max_positions, n_seq_max=self._n_seq)

    # -- decoding ------------------------------------------------------------------------------

    def _decode(self, rows: list[list[int]], *, all_logits: bool) -> list[np.ndarray]:
        """Append ``rows[s]`` to cached sequence ``s``, every sequence in the same ``llama_decode``
        calls (``n_batch`` tokens each, each token tagged with its sequence); per row, every new
        position's logits ([n, vocab]) when ``all_logits``, else its last one's ([1, vocab])."""
        llama_cpp, batch = self._llama, self._batch
        starts = [len(self._rows[s]) if s < len(self._rows) else 0 for s in range(len(rows))]
        longest = max(start + len(r) for start, r in zip(starts, rows))
        if longest > self.max_positions:
            raise BadInput(f"{longest} tokens exceed the llama.cpp context of {self.max_positions} positions; shorten "
                           f"the prompt or give a larger n_ctx (at most {self.n_ctx_train})")
        # (sequence, position, token, wants logits) in row order
        work = [(s, start + i, int(t), all_logits or i == len(r) - 1)
                for s, (start, r) in enumerate(zip(starts, rows)) for i, t in enumerate(r)]
        outs: list[list[np.ndarray]] = [[] for _ in rows]
        for off in range(0, len(work), self.n_batch):
            chunk = work[off:off + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, (seq, pos, token, flag) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, flag
                batch.seq_id[i][0] = seq
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                for s, start in enumerate(starts):
                    llama_cpp.llama_memory_seq_rm(self._memory, s, start, -1)
                if rc == 1:
                    raise BadInput(f"llama.cpp found no room in its KV cache for {len(chunk)} more tokens; give a "
                                   "larger n_ctx")
                raise RuntimeError(f"llama_decode returned {rc} at token {off} of {len(work)}")
            flagged = [seq for seq, _, _, flag in chunk if flag]
            if flagged:  # llama.cpp's logits buffer holds the flagged tokens' rows in batch order
                ptr = llama_cpp.llama_get_logits(self._ctx)
                logits = np.ctypeslib.as_array(ptr, shape=(len(flagged), self.vocab_size))
                for j, seq in enumerate(flagged):
                    outs[seq].append(logits[j].copy())
        self._rows = [(self._rows[s] if s < len(self._rows) else []) + list(r) for s, r in enumerate(rows)]
        return [np.stack(o) for o in outs]

    def _clear(self) -> None:
        self._llama.llama_memory_clear(self._memory, True)
        self._rows = []

    @staticmethod
    def _real_rows(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
        """Each row's real tokens (the padding is never decoded: a row is a sequence of its own)."""
        return [[int(t) for t in ids[r][mask[r] > 0]] for r in range(ids.shape[0])]

    def _forward(self, ids, mask, positions, *, start, keep):
        if start:
            self._clear()
            if ids.shape[0] > self._n_seq:  # generate on several prompts: room for every sequence
                self.reserve(ids.shape[0], self.max_positions)
            rows = self._real_rows(ids, mask)
        else:
            if ids.shape[0] != len(self._rows):
                raise BadInput(f"got {ids.shape[0]} rows for a cache of {len(self._rows)} sequences")
            rows = [[int(t) for t in row] for row in ids]
        out = self._decode(rows, all_logits=keep > 1)
        return np.stack([o[-keep:] for o in out])

    def _full(self, ids, mask, positions):
        """Every position's logits, one sequence at a time (padding positions left at 0). The
        sequences in progress are decoded again afterwards, so they continue as before."""
        kept = [list(r) for r in self._rows]
        out = np.zeros((ids.shape[0], ids.shape[1], self.vocab_size), dtype=np.float32)
        try:
            for r, tokens in enumerate(self._real_rows(ids, mask)):
                self._clear()
                out[r, mask[r] > 0] = self._decode([tokens], all_logits=True)[0]
        finally:
            self._clear()
            if kept:
                self._decode(kept, all_logits=False)
        return out

    def _truncate(self, length: int) -> None:
        """Keep every sequence's first ``length`` positions (``rollback``): llama.cpp drops the
        rest of its KV cache in place (``llama_memory_seq_rm``)."""
        for s, row in enumerate(self._rows):
            padding = self.past_length - len(row)  # a padded prompt's padding was never decoded
            keep = max(0, int(length) - padding)
            self._llama.llama_memory_seq_rm(self._memory, s, keep, -1)
            self._rows[s] = row[:keep]

    def reset(self) -> None:
        super().reset()
        if getattr(self, "_ctx", None):
            self._clear()

    def close(self) -> None:
        self._free_context()
        if getattr(self, "_model", None):
            self._llama.llama_model_free(self._model)
            self._model = None
        super().reset()
        self._rows = []

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
