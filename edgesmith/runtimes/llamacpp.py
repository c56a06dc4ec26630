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

import ctypes
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, GgufModel
from edgesmith.artifacts import gguf as gguf_artifacts
from edgesmith.artifacts.gguf import check_gguf_file
from edgesmith.errors import BadInput
from edgesmith.runtimes.base import Availability, Runtime
from edgesmith.runtimes.decoder import DecoderSession

log = logging.getLogger(__name__)

NAME = "llamacpp"
INSTALL = "pip install edgesmith[llamacpp]"
#: the KV cache's positions when none is asked for (capped by the model's training context)
DEFAULT_N_CTX = 4096
#: tokens per llama_decode call (llama.cpp's default n_batch / n_ubatch)
DEFAULT_N_BATCH = 512
_LLAMA_LOGGER = "llama-cpp-python"
_backend_ready = False


def import_llama_cpp():
    """The ``llama_cpp`` module, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise BadInput(f"runtime '{NAME}' needs llama-cpp-python, which is not installed here: {INSTALL}") from None
    except OSError as exc:  # the package is there but its compiled library does not load
        raise BadInput(f"runtime '{NAME}': llama-cpp-python is installed but its library does not load "
                       f"({str(exc).splitlines()[0][:200]}); reinstall it: {INSTALL}") from None
    global _backend_ready
    if not _backend_ready:
        # llama.cpp logs every tensor it loads to stderr; keep errors only (its logger's level)
        logging.getLogger(_LLAMA_LOGGER).setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def build_info() -> dict[str, Any]:
    """llama-cpp-python's version and llama.cpp's compiled features (``llama_print_system_info``)."""
    llama_cpp = import_llama_cpp()
    return {"llama_cpp_python": metadata.version("llama-cpp-python"),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


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
# ---------------------------------------------------------------------------------------------


def _load_model(llama_cpp, path: Path, *, vocab_only: bool = False):
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BadInput(f"{path}: llama.cpp cannot load this GGUF (an architecture or tensor type this llama.cpp "
                       "does not know, or a damaged file); upgrade llama-cpp-python or re-export the model")
    return model


def _usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS says), llama.cpp's default here."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _meta_str(llama_cpp, model, key: str) -> str | None:
    """A GGUF metadata value as text (None when the key is absent)."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else None


def _model_desc(llama_cpp, model) -> str:
    """llama.cpp's one-line description of a loaded model: architecture, size, file type."""
    buf = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(model, buf, len(buf))
    return buf.value.decode(errors="replace")


def training_context(path: Path) -> int | None:
    """The context the model was trained for (``{arch}.context_length``), from a vocab-only load;
    None when the file does not say."""
    llama_cpp = import_llama_cpp()
    model = _load_model(llama_cpp, path, vocab_only=True)  # a vocab-only load has no hparams, only the keys
    try:
        arch = _meta_str(llama_cpp, model, "general.architecture")
        value = _meta_str(llama_cpp, model, f"{arch}.context_length") if arch else None
    finally:
        llama_cpp.llama_model_free(model)
    try:
        n = int(value) if value is not None else 0
    except ValueError:
        n = 0
    return n if n > 0 else None


class GgufTokenizer:
    """llama.cpp's tokenizer of a GGUF file (a vocab-only load), called like a Hugging Face
    tokenizer: ``tok(text)["input_ids"]`` adds BOS where the file says to; ``decode(ids)``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._model = None
        self._vocab = None

    def _ensure(self):
        if self._vocab is None:
            llama_cpp = import_llama_cpp()
            self._llama = llama_cpp
            self._model = _load_model(llama_cpp, self.path, vocab_only=True)
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        return self._llama, self._vocab

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = False) -> list[int]:
        llama_cpp, vocab = self._ensure()
        data = text.encode("utf-8")
        room = len(data) + 8
        while True:
            out = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), out, room, add_special_tokens, parse_special)
            if n >= 0:
                return [int(t) for t in out[:n]]
            room = -n

    @property
    def chat_template(self) -> str | None:
        """The file's ``tokenizer.chat_template``, or None."""
        llama_cpp, _ = self._ensure()
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def _special_text(self, token: int) -> str:
        return "" if token == self._llama.LLAMA_TOKEN_NULL else self.decode([token])

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True,
                            **_: Any) -> list[int] | str:
        """The file's chat template rendered as transformers renders it (a sandboxed Jinja
        environment, trim_blocks/lstrip_blocks), tokenized with its special tokens parsed."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.chat_template
        if not template:
            raise BadInput(f"{self.path}: the GGUF has no chat template; give the prompt as plain text (--no-chat)")
        llama_cpp, vocab = self._ensure()

        def raise_exception(message: str) -> None:
            raise BadInput(f"{self.path}: the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(int(llama_cpp.llama_vocab_bos(vocab))),
            eos_token=self._special_text(int(llama_cpp.llama_vocab_eos(vocab))))
        return self.encode(text, add_special_tokens=False, parse_special=True) if tokenize else text

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False, **_: Any) -> str:
        llama_cpp, vocab = self._ensure()
        pieces = b""
        buf = ctypes.create_string_buffer(256)
        for token in ids:
            n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, not skip_special_tokens)
            if n < 0:  # a longer piece: -n bytes are needed
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, not skip_special_tokens)
            pieces += buf.raw[:max(n, 0)]
        return pieces.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._model is not None:
            self._llama.llama_model_free(self._model)
        self._model = self._vocab = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


# ---------------------------------------------------------------------------------------------
# The decoder session
# ---------------------------------------------------------------------------------------------


class LlamaCppDecoderSession(DecoderSession):
    """A GGUF decoder in llama.cpp, one sequence (batch 1) in its KV cache.

    ``threads`` sets llama.cpp's threads for decode and for prompt batches (default: every core
    this process may use); ``n_ctx`` the KV cache's positions; ``n_batch`` tokens per decode call;
    ``flash_attn`` llama.cpp's flash attention (off, llama.cpp's CPU default)."""

    runtime = NAME

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
    """llama.cpp through llama-cpp-python: runs GGUF decoders (generation sessions)."""

    name = "llamacpp"
    kinds = ("gguf",)

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

    def load(self, artifact: Artifact, **options: Any) -> LlamaCppDecoderSession:
        self.check(artifact)
        return LlamaCppDecoderSession(artifact, **options)
